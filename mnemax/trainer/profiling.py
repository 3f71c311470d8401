"""`run.profile=START:STEPS`: a `jax.profiler` trace of a window of training steps.

The trace goes to `run_dir/profile/plugins/profile/<time>/<host>.xplane.pb` (with a Perfetto
`*.trace.json.gz` beside it), the layout TensorBoard's profile plugin (xprof) reads; open
`run_dir/profile` in TensorBoard, or the `.trace.json.gz` in ui.perfetto.dev. Only process 0
traces, so processes sharing a host name do not overwrite each other's file.
"""

from __future__ import annotations

from typing import Any

import jax
from etils import epath

PROFILE_DIR = "profile"


class StepProfiler:
    """Starts a trace before step `first` is dispatched and stops it once step `last` has
    finished (steps numbered from 1, as in `metrics.jsonl`). A resumed run inside the window
    traces the steps it has left. The compile of the first step happens before any dispatch
    (the loop compiles ahead), so it is not in the trace."""

    def __init__(self, window: tuple[int, int] | None, run_dir: epath.Path, *, enabled: bool):
        self.window = window if enabled else None
        self.directory = run_dir / PROFILE_DIR
        self.tracing = False
        self.traced: list[int] = []  # steps this process traced

    def before_step(self, step: int) -> None:
        """Called before dispatching step `step` (the state is at `step - 1`)."""
        if self.window and not self.tracing and self.window[0] <= step <= self.window[1]:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after_step(self, step: int, outputs: Any) -> bool:
        """Called once step `step` is dispatched; True when this call ended the trace."""
        if not self.tracing:
            return False
        self.traced.append(step)
        if step < self.window[1]:
            return False
        self.stop(outputs)
        return True

    def stop(self, outputs: Any = None) -> None:
        if self.tracing:
            jax.block_until_ready(outputs)  # the traced steps' device work is in the trace
            jax.profiler.stop_trace()
            self.tracing = False

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
