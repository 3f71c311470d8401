"""grouped_matmul: megablox (interpret mode) and ragged_dot against float64 loops, forward and
both gradients; megablox compiled for TPU v5p at a production MoE shape; bad shapes named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.layers.kernels.grouped_matmul import grouped_matmul, megablox_supported
from mnemax.layers.kernels.grouped_matmul.op import tiling

# 600 rows (two 512-row tiles, the second ragged), K = 256, N = 384 (three 128-column tiles);
# groups of 0 rows (an idle expert), of a size that ends inside a tile, and 23 rows past the
# last group (padding a caller may pass: they must come out zero with zero gradient).
M, K, N = 600, 256, 384
GROUPS = np.array([130, 0, 260, 7, 180])


def _inputs():
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((M, K)).astype(np.float32)
    rhs = rng.standard_normal((len(GROUPS), K, N)).astype(np.float32)
    probe = rng.standard_normal((M, N)).astype(np.float32)  # d loss / d out
    return lhs, rhs, probe


def _float64(lhs, rhs, probe):
    """out, d_lhs, d_rhs of sum(out * probe) by a loop over groups, in float64."""
    lhs, rhs, probe = (np.asarray(a, np.float64) for a in (lhs, rhs, probe))
    out, d_lhs, d_rhs = np.zeros((M, N)), np.zeros((M, K)), np.zeros(rhs.shape)
    start = 0
    for e, size in enumerate(GROUPS):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[e]
        d_lhs[rows] = probe[rows] @ rhs[e].T
        d_rhs[e] = lhs[rows].T @ probe[rows]
        start += size
    return out, d_lhs, d_rhs


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret"], ids=["ragged_dot",
                                                                         "megablox"])
def test_grouped_matmul_and_its_gradients_match_float64(impl):
    """Tolerance: every entry is an fp32 dot product of at most max(K, rows of a group) = 260
    products of N(0, 1) terms; fp32 accumulation errs by at most n u sum|terms| (u = 6e-8), so
    |err| <= 260 x 6e-8 x 260 x 0.8 (E|xy|) ~ 3e-3 in the worst case and ~1e-4 typically
    against entries of size ~16: atol 5e-3. A row of the wrong group, a skipped tile or a
    missing gradient is off by O(10)."""
    lhs, rhs, probe = _inputs()
    sizes = jnp.asarray(GROUPS, jnp.int32)
    assert tiling(M, K, N) == (512, 256, 128) and megablox_supported(K, N)

    def value_and_grads(lhs, rhs):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, impl=impl), lhs, rhs)
        return (out, *vjp(jnp.asarray(probe)))

    got = jax.jit(value_and_grads)(lhs, rhs)
    for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, _float64(lhs, rhs, probe),
                          strict=True):
        g = np.asarray(g)
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=5e-3, err_msg=name)
    assert not np.asarray(got[0][GROUPS.sum():]).any()  # padding rows: exactly zero


def test_megablox_compiles_for_tpu_with_its_gradients():
    """Value and gradients at a production MoE shape (16,384 tokens x top-2 rows, 8 experts,
    d = 2048 -> 1,408 expert width: not a power of two, tn = 128) compile to megablox calls on
    v5p; `auto` picks megablox there (a kernel that ships with JAX)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from mnemax.layers.kernels.dispatch import TPU_CUSTOM_CALL
    from tests.kernels.test_tpu_compile import _mesh

    mesh = _mesh("v5p")
    m, k, n, e = 32768, 2048, 1408, 8
    sharding = NamedSharding(mesh, PartitionSpec())
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in
            (((m, k), jnp.bfloat16), ((e, k, n), jnp.bfloat16), ((e,), jnp.int32))]

    def loss_and_grads(lhs, rhs, sizes):
        def loss(lhs, rhs):
            return jnp.sum(grouped_matmul(lhs, rhs, sizes).astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss, (0, 1))(lhs, rhs)

    with jax.set_mesh(mesh):
        text = jax.jit(loss_and_grads).lower(*args).compile().as_text()
    assert text.count(f'custom_call_target="{TPU_CUSTOM_CALL}"') == 3  # gmm, gmm^T, tgmm


def test_bad_shapes_are_named():
    lhs, rhs = jnp.zeros((8, 16)), jnp.zeros((2, 16, 4))
    with pytest.raises(ConfigError, match=r"group_sizes \(3,\) must be \[E\] with E = 2"):
        grouped_matmul(lhs, rhs, jnp.zeros(3, jnp.int32))
    with pytest.raises(ConfigError, match="same K"):
        grouped_matmul(lhs, jnp.zeros((2, 8, 4)), jnp.zeros(2, jnp.int32))
    assert not megablox_supported(64, 128)  # tiny shapes: ragged_dot
