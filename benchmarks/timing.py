"""Timing helpers shared by the benchmarks (run them as scripts: this directory is on sys.path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax


def median_time(fn: Callable, args: Sequence, iters: int, warmup: int = 1) -> float:
    """Median wall time in seconds of `fn(*args)` over `iters` synchronised calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_train_steps(step: Callable, state, batch, steps: int) -> tuple[object, list[float]]:
    """Runs one warm-up step, then `steps` timed ones threading the (donated) state through;
    returns the final state and the wall time in seconds of each timed step."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, times
