"""`dispatch.select`: which function each `impl` runs on each platform, for toy backends that
add a different constant, so the lowered program shows which branch a platform got."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels import dispatch

# Each backend adds its own constant; they are far apart and never sums of one another.
ADDS = {"reference": 1001.0, "gpu": 2002.0, "tpu": 3003.0, "gpu_interpret": 4004.0,
        "tpu_interpret": 5005.0}
BACKENDS = {name: (lambda x, c=c: x + c) for name, c in ADDS.items()}
X = jnp.zeros((4,), jnp.float32)


def _select(impl, auto_platforms=("cuda", "tpu"), **overrides):
    return dispatch.select(impl, **{**BACKENDS, **overrides}, auto_platforms=auto_platforms)


def _branches(fn, platform):
    """The backends whose constant appears in `fn` exported for `platform`."""
    text = jax.export.export(jax.jit(fn), platforms=[platform])(X).mlir_module()
    return {name for name, c in ADDS.items() if f"{c:.6e}" in text}


@pytest.mark.parametrize(("impl", "auto_platforms", "cuda", "tpu", "cpu"), [
    ("auto", ("cuda", "tpu"), "gpu", "tpu", "reference"),
    ("auto", ("tpu",), "reference", "tpu", "reference"),
    ("auto", (), "reference", "reference", "reference"),  # nothing measured yet
    ("reference", ("cuda", "tpu"), "reference", "reference", "reference"),
    ("pallas", (), "gpu", "tpu", "gpu_interpret"),  # auto_platforms is for `auto` only
    ("pallas_interpret", (), "gpu_interpret", "gpu_interpret", "gpu_interpret"),
])
def test_each_platform_gets_the_backend_impl_asks_for(impl, auto_platforms, cuda, tpu, cpu):
    fn = _select(impl, auto_platforms)
    for platform, expected in (("cuda", cuda), ("tpu", tpu), ("cpu", cpu)):
        assert _branches(fn, platform) == {expected}, (impl, platform)
    np.testing.assert_array_equal(fn(X), X + ADDS[cpu])  # and this CPU host runs the cpu one


def test_nothing_to_choose_returns_the_reference_itself():
    """No branch in the program when every platform would run the reference."""
    ref = BACKENDS["reference"]
    assert _select("auto", ()) is ref
    assert _select("pallas", gpu=None, tpu=None, gpu_interpret=None, tpu_interpret=None) is ref


def test_a_missing_kernel_falls_back_or_raises():
    fn = _select("pallas", gpu=None)
    assert _branches(fn, "cuda") == {"reference"} and _branches(fn, "tpu") == {"tpu"}
    with pytest.raises(ValueError, match="no gpu kernel"):
        _select("pallas_interpret", gpu_interpret=None)
    assert dispatch.select("pallas_interpret", **BACKENDS, auto_platforms=(),
                           interpret_backend="tpu") is BACKENDS["tpu_interpret"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="impl='triton' is not one of"):
        _select("triton")
    with pytest.raises(ValueError, match="interpret_backend='cpu'"):
        dispatch.select("auto", **BACKENDS, auto_platforms=(), interpret_backend="cpu")
    with pytest.raises(ValueError, match=r"auto_platforms \['gpu'\]"):
        _select("auto", ("gpu",))
