"""Where metrics go: `metrics.jsonl` and the run's trackers (TensorBoard, wandb);
`format_train_line` makes the console line."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from etils import epath

from mnemax.trainer.config import Tracker
from mnemax.trainer.trackers import open_trackers, scalars


class MetricsWriter:
    """Appends `{"step": ..., ...}` records to `run_dir/metrics.jsonl` and hands their numeric
    fields to the trackers named in `trackers` (`mnemax.trainer.trackers`; `config`, the
    resolved recipe, is wandb's run config).

    In a multi-process job only process 0 writes (`enabled=False` elsewhere: every method is
    then a no-op and no tracker is opened), so the file has one record per step. `run_dir` may
    be a URL (gs://...): TensorBoard writes there itself; `metrics.jsonl` is rewritten whole at
    each record, since object stores cannot append.

    Besides the step's own metrics the training loop writes, per record, `data_wait_s` (seconds
    spent fetching batches) and `checkpoint_s` (seconds spent in checkpoint saves), each summed
    since the previous record, and in the first record of each process `compile_s` (the train
    step's ahead-of-time `lower().compile()`; a load when the compilation cache has it).
    """

    def __init__(self, run_dir: epath.PathLike, *,
                 trackers: Sequence[Tracker] = ("tensorboard",),
                 config: dict[str, Any] | None = None, enabled: bool = True):
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._local = "://" not in str(run_dir)
        self.trackers = (open_trackers(trackers, epath.Path(run_dir), config)
                         if enabled else [])

    def truncate_after(self, step: int) -> None:
        """Drops records of steps > `step` (written by a run that died before its next
        checkpoint; the resumed run writes them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in record.items()}
        line = json.dumps(clean) + "\n"
        if self._local:
            with open(str(self.path), "a") as f:
                f.write(line)
        else:
            old = self.path.read_text() if self.path.exists() else ""
            self.path.write_text(old + line)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), scalars(clean))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def format_duration(seconds: float) -> str:
    """`3725.4` -> `1:02:05` (hours:minutes:seconds; hours grow past 24)."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def format_train_line(record: dict[str, Any], total_steps: int, *,
                      elapsed_s: float | None = None, eta_s: float | None = None) -> str:
    """`step 120/300 | loss 2.1034 | lr 2.90e-03 | gnorm 0.410 | 21.3k tok/s | MFU 11.2% |
    96 ms/step | elapsed 0:03:12 | ETA 0:04:48`: `elapsed_s` is the wall time since the run
    (this process) started, `eta_s` the estimated time to `total_steps`."""
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.3f}"]
    if "tokens_per_sec" in record:
        parts.append(f"{record['tokens_per_sec'] / 1e3:.1f}k tok/s")
    if "mfu" in record and math.isfinite(record["mfu"]):
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "step_time_s" in record:
        parts.append(f"{1e3 * record['step_time_s']:.0f} ms/step")
    if "peak_memory_gb" in record:
        parts.append(f"peak {record['peak_memory_gb']:.1f} GB")
    if elapsed_s is not None:
        parts.append(f"elapsed {format_duration(elapsed_s)}")
    if eta_s is not None and math.isfinite(eta_s):
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)
