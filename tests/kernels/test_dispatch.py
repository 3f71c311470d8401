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


def _loop_count(fn, *args) -> int:
    """While loops in the StableHLO `fn(*args)` lowers to (a fully unrolled scan stays a scan
    equation in the jaxpr but lowers to straight-line code)."""
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.while")


def test_unrolled_loops_leave_no_loop_in_the_ops_and_the_same_values():
    from mnemax.layers.kernels.block_sparse_attention import blocks
    from mnemax.layers.kernels.gated_delta import gated_delta_rule

    key = jax.random.split(jax.random.key(0), 8)
    b, t, h, d = 1, 64, 1, 16  # 2 chunks of 32; 4 query blocks of 16 in 2 steps
    q, k, v = (jax.random.normal(key[i], (b, t, h, d)) for i in range(3))
    q, k = q / jnp.linalg.norm(q, axis=-1, keepdims=True), k / jnp.linalg.norm(k, axis=-1,
                                                                                keepdims=True)
    g = -jax.nn.softplus(jax.random.normal(key[3], (b, t, h)))
    beta = jax.nn.sigmoid(jax.random.normal(key[4], (b, t, h)))
    idx = jnp.broadcast_to(jnp.arange(4)[:, None] - jnp.arange(2), (b, h, 4, 2))
    idx = jnp.where(idx >= 0, idx, -1).astype(jnp.int32)
    mask = jnp.ones((b, h, t, 2), bool)

    def gdn(q, k, v):
        return jnp.sum(gated_delta_rule(q, k, v, g, beta, chunk_size=32, impl="reference")[0]
                       ** 2)

    def sparse(q, k, v):
        return jnp.sum(blocks.attention(q, k, v, idx, mask, block_size=16, window=None,
                                        scale=d ** -0.5, query_blocks_per_step=2) ** 2)

    for fn in (gdn, sparse):
        # A new function object per trace: jit caches a function's trace, loops and all.
        grad = lambda: jax.value_and_grad(lambda *a: fn(*a), argnums=(0, 1, 2))  # noqa: B023
        assert _loop_count(grad(), q, k, v) >= 2  # forward and backward loops
        looped = jax.jit(grad())(q, k, v)
        with dispatch.unrolled_loops():
            assert _loop_count(grad(), q, k, v) == 0
            unrolled = jax.jit(grad())(q, k, v)
        assert _loop_count(grad(), q, k, v) >= 2  # the setting ends with the context
        # The same operations in the same order per iteration; only XLA's fusion across
        # iterations may differ, which moves fp32 results by a few ulps.
        for a, c in zip(jax.tree.leaves(looped), jax.tree.leaves(unrolled), strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
