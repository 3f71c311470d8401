"""The training console: rich on a terminal, unwrapped lines when piped, and `train.log`.

rich wraps at 80 columns when stdout is not a terminal (a log file, CI), which cut the
training line in two; piped output keeps each printed line whole (`soft_wrap`). What the
console prints is also appended to `run_dir/train.log`, each line stamped with the UTC time.
"""

from __future__ import annotations

import datetime
import io
from typing import Any

from etils import epath
from rich.console import Console

LOG_FILE = "train.log"


def make_console() -> Console:
    """A console for stdout: rich's wrapping on a terminal, none when piped."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True)
    return console


def _stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class LoggedConsole:
    """Prints to `console` and appends the same text, without markup or colour and one
    timestamped line per printed line, to `path` (`2026-12-01T21:52:40.123+00:00 step 10/300
    | ...`). `path` may be a URL: object stores cannot append, so the file is rewritten."""

    def __init__(self, console: Console, path: epath.PathLike):
        self.console = console
        self.path = epath.Path(path)
        self._local = "://" not in str(path)
        self._text = ""  # what this run wrote, for URL paths
        self._plain = Console(file=io.StringIO(), color_system=None, highlight=False,
                              soft_wrap=True, force_terminal=False, width=10_000)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.console.print(*objects, **kwargs)
        buffer = self._plain.file
        buffer.seek(0)
        buffer.truncate()
        self._plain.print(*objects, **{**kwargs, "soft_wrap": True})
        stamp = _stamp()
        lines = "".join(f"{stamp} {line}\n" for line in buffer.getvalue().splitlines())
        if self._local:
            with open(str(self.path), "a") as f:
                f.write(lines)
        else:
            if not self._text and self.path.exists():
                self._text = self.path.read_text()
            self._text += lines
            self.path.write_text(self._text)

    def __getattr__(self, name: str) -> Any:  # width, is_terminal, ...: the console's
        return getattr(self.console, name)
