"""Multi-process start-up with JAX's own distributed runtime."""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes a multi-process job.

    Recognised: `MNEMAX_COORDINATOR` (host:port) with `MNEMAX_NUM_PROCESSES` and
    `MNEMAX_PROCESS_ID`, or the variables JAX detects by itself (SLURM, TPU pods, Kubernetes
    JobSet via `JAX_COORDINATOR_ADDRESS`). Returns whether it initialised.
    """
    if os.environ.get("MNEMAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=os.environ["MNEMAX_COORDINATOR"],
            num_processes=int(os.environ["MNEMAX_NUM_PROCESSES"]),
            process_id=int(os.environ["MNEMAX_PROCESS_ID"]),
        )
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()
        return True
    return False
