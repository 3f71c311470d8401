"""Host-side agreement between the processes of a multi-process job, through the distributed
runtime's coordination service (its key-value store and barriers), not through device
collectives.

Why not a collective (`multihost_utils.sync_global_devices`, `process_allgather`): those run a
jitted program, so each process compiles it first; and on CPU the first collective opens the
gloo context, which waits only 30 s for the other processes. A restarted job whose process 0
found its programs in the persistent compilation cache (only process 0 writes it) while the
others compile them again, ran 30 s ahead and failed there ("Gloo context initialization
failed: GetKeyValue() timed out"). Barriers of the coordination service take a timeout, and
the loop waits at one after compiling the first step (`compile_then_align`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax

# Long enough for the slowest process to compile a large step with a cold cache.
ALIGN_TIMEOUT_S = 1800
_calls = itertools.count()  # every process makes the same calls in the same order


def _client() -> Any:
    """JAX's distributed-runtime client (the one orbax's multihost helpers use)."""
    from jax._src import distributed

    return distributed.global_state.client


def barrier(name: str, timeout_s: float = ALIGN_TIMEOUT_S) -> None:
    """Waits until every process has reached `barrier(name)` (no-op with one process)."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(f"mnemax/{name}/{next(_calls)}", int(timeout_s * 1000))


def all_processes(ok: bool, name: str = "agree", timeout_s: float = ALIGN_TIMEOUT_S) -> bool:
    """Whether `ok` holds on every process: each posts its value, then reads all of them."""
    if jax.process_count() == 1:
        return ok
    client, key = _client(), f"mnemax/{name}/{next(_calls)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if ok else "0")
    values = [client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000))
              for p in range(jax.process_count())]
    return all(v == "1" for v in values)


def compile_then_align(step: Callable, *args: Any) -> Callable:
    """`step` compiled ahead of time for `args`, returned once every process has compiled it
    (one process: `step` itself, compiled at its first call as usual)."""
    if jax.process_count() == 1:
        return step
    compiled = step.lower(*args).compile()
    barrier("first_step_compiled")
    return compiled
