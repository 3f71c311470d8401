"""JAX's persistent compilation cache, so that a restarted run (after a preemption, a crash or
a resume with more steps) loads its compiled step instead of compiling it again.

Where: `run.compile_cache_dir` when the recipe sets it (a path or URL; "" turns the cache off),
else `$JAX_COMPILATION_CACHE_DIR` when set (JAX reads it itself), else the user's cache
directory (`$XDG_CACHE_HOME/mnemax/xla`, by default `~/.cache/mnemax/xla`). The cache is keyed by
the program, the compiler version and the devices, so a shared directory is safe.
"""

from __future__ import annotations

import os

import jax

from mnemax.trainer.config import RunConfig

# JAX's default (1 s) would skip small programs; a restart should not recompile the eval step
# or the init either, and entries are small.
MIN_COMPILE_TIME_S = 0.5


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/mnemax/xla`, or `~/.cache/mnemax/xla`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mnemax", "xla")


def cache_dir_for(run: RunConfig) -> str | None:
    """The directory the cache uses for `run`, or None when it is off."""
    if run.compile_cache_dir is not None:
        return run.compile_cache_dir or None
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()


def enable_compile_cache(run: RunConfig) -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir_for(run)`; returns it.

    JAX opens the cache at its first compilation and keeps that directory for the process: call
    this before anything is compiled (the command line does, through `train` and `evaluate`).
    """
    directory = cache_dir_for(run)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return directory
