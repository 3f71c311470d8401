"""`events.jsonl`: what happened to a run, one JSON object a line, appended by process 0.

Kinds: `start` (a fresh run), `resume` (from a checkpoint), `fallback` (the newest checkpoint
could not be read and an older one was used), `preemption` (a stop signal was agreed on and
a checkpoint saved), `fault` (non-finite loss, an error that ended the run), `end`. Every
record has `time` (UTC, ISO 8601), `unix_time`, `kind` and `step`; some add fields
(`skipped_step`, `reason`, `processes`, `policy`).
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any, Literal

from etils import epath

EventKind = Literal["start", "resume", "fallback", "preemption", "fault", "end"]


class EventLog:
    """Appends events to `run_dir/events.jsonl` (a no-op on every process but the primary)."""

    def __init__(self, run_dir: epath.PathLike, *, primary: bool = True):
        self.path = epath.Path(run_dir) / "events.jsonl"
        self._primary = primary

    def record(self, kind: EventKind, step: int | None, **fields: Any) -> None:
        if not self._primary:
            return
        now = time.time()
        stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        event = {"time": stamp.isoformat(timespec="milliseconds"), "unix_time": round(now, 3),
                 "kind": kind, "step": step, **fields}
        line = json.dumps(event) + "\n"
        # epath has no append mode (object stores have none): read and rewrite, events are few.
        old = self.path.read_text() if self.path.exists() else ""
        self.path.write_text(old + line)


def read_events(run_dir: epath.PathLike) -> list[dict]:
    """The events of a run directory, oldest first."""
    path = epath.Path(run_dir) / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
