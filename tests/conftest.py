"""Test set-up: 8 fake CPU devices and a private data cache, before JAX is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
# Most of the suite's time goes to compiling small programs that then run for milliseconds, so
# XLA:CPU compiles with LLVM at -O0 (`jax_disable_most_optimizations`): memory_plus_tiny's train
# step compiles in 20.6 s instead of 33.5 s on 2 cores. Only the machine code LLVM emits
# changes, not the HLO, the buffer assignment or the IEEE semantics of the operations (XLA:CPU
# allows no fast-math reassociation at any level), and libtpu's compiles give the same memory
# and cost figures (checked on tiny's and gdn_tiny's train steps for v5e:2x2). Tests that run
# long programs are marked `optimized_xla` and compile as users do (-O0 code runs up to 4x
# slower: tiny's 50 training steps take 120 s instead of 72 s). Subprocesses inherit the
# setting.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("MNEMAX_CACHE", tempfile.mkdtemp(prefix="mnemax-test-cache-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu's compile-only topologies (TPU compile tests) take a machine-wide lock file by default,
# so a second process (the other pytest worker, another suite) fails with "ABORTED: ... libtpu
# multi-process lockfile"; compile-only use needs no exclusive TPU access.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Many tests compile the same small programs (and CLI tests run them in subprocesses): a
# compilation cache shared by the pytest workers and their children compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["MNEMAX_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest

from mnemax.launch.compile import quiet_compile_only_libtpu
from mnemax.recipes.registry import load_recipe
from tests.helpers import SMALL

# Tests compile for TPU topologies on machines without TPU chips: no metadata look-ups, no
# libtpu error paragraphs.
quiet_compile_only_libtpu()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "optimized_xla: compile this test's programs with XLA's full optimizations "
        "(tests whose time goes to running long programs rather than to compiling them)")


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """Full XLA optimizations for `optimized_xla` tests (see the top of this file)."""
    if request.node.get_closest_marker("optimized_xla") is None:
        yield
        return
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def small_recipe():
    """`small_recipe(*overrides)`: the tiny recipe shrunk to a 2-layer, 64-wide model."""

    def make(*overrides: str):
        return load_recipe("tiny", [*SMALL, *overrides])

    return make
