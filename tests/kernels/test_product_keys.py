"""product_key_topk equals the brute-force top-k over all n*n product keys, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels import product_keys

# jitted: eager dispatch of the dozen small ops costs more than the test itself
product_key_topk = jax.jit(product_keys.product_key_topk, static_argnums=2)

N_SUB, D_HALF = 8, 4


def _all_scores(query, subkeys):
    """fp32 scores of all n*n keys `[..., n*n]`, flat index i1 * n + i2."""
    s = jnp.einsum("...hd,hnd->...hn", query, subkeys, preferred_element_type=jnp.float32)
    return (s[..., 0, :, None] + s[..., 1, None, :]).reshape(*s.shape[:-2], -1)


def _inputs(batch, integer, seed):
    kq, kc = jax.random.split(jax.random.key(seed))
    if integer:  # entries in {-1, 0, 1}: scores are small integers, many exact ties
        q = jax.random.randint(kq, (*batch, 2, D_HALF), -1, 2).astype(jnp.float32)
        c = jax.random.randint(kc, (2, N_SUB, D_HALF), -1, 2).astype(jnp.float32)
    else:
        q = jax.random.normal(kq, (*batch, 2, D_HALF))
        c = jax.random.normal(kc, (2, N_SUB, D_HALF))
    return q, c


@pytest.mark.parametrize("batch", [(), (3,), (2, 5)], ids=str)
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "int_ties"])
def test_equals_brute_force(batch, k, integer):
    q, c = _inputs(batch, integer, seed=k)
    scores, idx = product_key_topk(q, c, k)
    want_scores, want_idx = jax.lax.top_k(_all_scores(q, c), k)
    assert scores.shape == idx.shape == (*batch, k) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(idx, want_idx)
    if integer:  # the tie rule is exercised: some selected scores are equal
        assert (np.diff(np.asarray(scores), axis=-1) == 0).any() or k == 1


def test_k_larger_than_subkeys_and_many_ties():
    q = jnp.zeros((4, 2, D_HALF))  # every key scores 0: order is the flat index
    c = jax.random.normal(jax.random.key(0), (2, N_SUB, D_HALF))
    _, idx = product_key_topk(q, c, 20)
    np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(20), (4, 20)))


def test_gradient_matches_brute_force():
    q, c = _inputs((6,), integer=False, seed=3)
    k = 4
    _, idx = product_key_topk(q, c, k)
    weights = jax.random.normal(jax.random.key(9), (6, k))

    def loss(q, c):
        return jnp.sum(jnp.tanh(product_key_topk(q, c, k)[0]) * weights)

    def brute_loss(q, c):  # the same selected keys, scored through all n*n keys
        return jnp.sum(jnp.tanh(jnp.take_along_axis(_all_scores(q, c), idx, -1)) * weights)

    got = jax.grad(loss, (0, 1))(q, c)
    want = jax.grad(brute_loss, (0, 1))(q, c)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert np.abs(np.asarray(got[0])).sum() > 0


def test_bad_shapes_are_named():
    q, c = _inputs((2,), integer=False, seed=0)
    with pytest.raises(ValueError, match=r"k=65"):
        product_keys.product_key_topk(q, c, 65)
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, d_half\]"):
        product_keys.product_key_topk(q[0, 0], c, 4)
    with pytest.raises(ValueError, match="subkeys"):
        product_keys.product_key_topk(q, c[:, :, :2], 4)
