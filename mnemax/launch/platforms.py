"""Which JAX backends the command line starts.

With libtpu installed (the dev install brings it for compile-only TPU topologies) JAX tries to
start a TPU backend on every machine; where there is no TPU chip that attempt fails and libtpu
logs a paragraph of errors before JAX falls back to the CPU. On a machine with neither a TPU
nor an NVIDIA GPU, the command line asks JAX for the CPU alone. Compiling for a TPU topology
(`mnemax compile`) loads libtpu as a plugin and is not affected. An explicit `JAX_PLATFORMS`
always wins.
"""

from __future__ import annotations

import os

import jax


def visible_accelerators() -> tuple[bool, bool]:
    """(a TPU chip, an NVIDIA GPU) on this machine, as JAX itself checks before starting libtpu;
    (True, True) for a JAX without these (private, stable across jax 0.4-0.12) helpers, so that
    it probes as it always does."""
    try:
        from jax._src import hardware_utils

        tpus, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        return tpus > 0, bool(hardware_utils.has_visible_nvidia_gpu())
    except Exception:
        return True, True


def skip_absent_tpu() -> None:
    """Starts JAX on the CPU alone when no accelerator is visible and JAX_PLATFORMS is unset.
    Call before the first `jax.devices()`."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if not any(visible_accelerators()):
        jax.config.update("jax_platforms", "cpu")
