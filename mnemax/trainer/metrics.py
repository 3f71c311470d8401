"""Where metrics go: a JSONL file and TensorBoard event files; `format_train_line` makes the
console line."""

from __future__ import annotations

import json
import math
from typing import Any

from etils import epath


class MetricsWriter:
    """Appends `{"step": ..., ...}` records to `run_dir/metrics.jsonl` and TensorBoard.

    In a multi-process job only process 0 writes (`enabled=False` elsewhere: every method is
    then a no-op), so the file has one record per step. `run_dir` may be a URL (gs://...):
    TensorBoard writes there itself; `metrics.jsonl` is rewritten whole at each record, since
    object stores cannot append.
    """

    def __init__(self, run_dir: epath.PathLike, *, tensorboard: bool = True,
                 enabled: bool = True):
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._local = "://" not in str(run_dir)
        self._tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(epath.Path(run_dir) / "tensorboard"))

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
        if self._tb is not None:
            step = int(record["step"])
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_train_line(record: dict[str, Any], total_steps: int) -> str:
    """`step 120/300 | loss 2.1034 | lr 2.9e-03 | gnorm 0.41 | 21.3k tok/s | MFU 11.2% | 96 ms`"""
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
    return " | ".join(parts)
