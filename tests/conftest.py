"""Test set-up: 8 fake CPU devices and a private data cache, before JAX is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
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


@pytest.fixture
def small_recipe():
    """`small_recipe(*overrides)`: the tiny recipe shrunk to a 2-layer, 64-wide model."""

    def make(*overrides: str):
        return load_recipe("tiny", [*SMALL, *overrides])

    return make
