"""Stop signals turned into one step at which every process saves and exits.

One process: SIGTERM / SIGINT set a flag that the loop reads after each step.

Several processes: a scheduler may signal one host, or all of them at slightly different
moments, while the hosts' Python loops run a few steps apart (dispatch is asynchronous). Acting
on each process's own signal lets hosts stop at different steps and hang in the collective save.
JAX's distributed runtime has the agreement built in (the preemption sync manager of
`jax.distributed.initialize`, as orbax and MaxText use it): its notifier catches SIGTERM in any
process, tells the coordinator, and from then on `reached_preemption_sync_point(step)` returns
True on every process at the same step (the largest step any process had reported, plus one).
So SIGTERM is left to that notifier, and SIGINT (Ctrl-C, or `mnemax launch local` forwarding
one) is turned into a SIGTERM to this process, which takes the same path.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopAgreement:
    """Context manager: `should_stop(step)` after each step; True at the same step everywhere.

    `should_stop` must be called on every process after every step (the sync manager compares
    step numbers across processes), starting from the same step (a common checkpoint).
    """

    def __init__(self) -> None:
        self.multi_process = jax.process_count() > 1
        self.received: str | None = None  # the signal this process got, when it got one
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopAgreement:
        handled = (signal.SIGINT,) if self.multi_process else STOP_SIGNALS
        for sig in handled:
            # Outside the main thread signal() raises: signals then stay with the caller.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    def should_stop(self, step: int) -> bool:
        """Whether to save at `step` (the state after `step` steps) and exit."""
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received is not None

    def describe(self) -> str:
        """What made the run stop, for the console and events.jsonl."""
        if not self.multi_process:
            return f"{self.received or 'stop signal'} received"
        mine = f", {self.received} here" if self.received else ""
        return f"stop agreed by all {jax.process_count()} processes (SIGTERM somewhere{mine})"

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
