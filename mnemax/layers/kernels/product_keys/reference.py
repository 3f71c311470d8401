"""Exact top-k over product keys in plain jnp: the ground truth, and the XLA path everywhere
(no kernel: the work is two small matmuls, two top-k's over n and one over k*k; a fused Pallas
kernel would not move fewer bytes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _top_k_by_index(scores: jax.Array, k: int):
    """Top-k of `scores [..., n]`, then re-ordered by ascending index: `(values, indices)`."""
    values, idx = jax.lax.top_k(scores, k)
    idx, values = jax.lax.sort((idx, values), num_keys=1)
    return values, idx


def reference(query: jax.Array, subkeys: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Exact top-k product keys: `query [..., 2, d_half]`, `subkeys [2, n, d_half]` ->
    `(scores [..., k] fp32, descending; indices [..., k] int32 = i1 * n + i2)`.

    Exactness: if (i1, i2) is in the top-k, i1 is in the top-k of s1 (otherwise k sub-keys j
    precede i1 in the (s1 desc, index asc) order, and the k keys (j, i2) all precede (i1, i2),
    having score >= and, on ties, a smaller flat index), and likewise i2 in the top-k of s2; so
    the k*k candidates contain the top-k. Candidates are laid out in ascending flat-index order
    (both candidate lists sorted by index), so `lax.top_k`'s lower-position-wins tie rule over
    them is the smaller-flat-index-wins rule of the brute force: results equal brute force
    bitwise, ties included.

    Gradients flow to query and subkeys through `scores` (indices are integers). Shapes are
    checked by `product_key_topk`.
    """
    n = subkeys.shape[1]
    # [..., 2, n]: s[..., h, i] = q_h . C_h[i]
    s = jnp.einsum("...hd,hnd->...hn", query, subkeys, preferred_element_type=jnp.float32)
    s1, s2 = s[..., 0, :], s[..., 1, :]
    kc = min(k, n)  # with k > n every sub-key is a candidate
    v1, i1 = _top_k_by_index(jax.lax.stop_gradient(s1), kc)
    v2, i2 = _top_k_by_index(jax.lax.stop_gradient(s2), kc)
    cand = (v1[..., :, None] + v2[..., None, :]).reshape(*s1.shape[:-1], kc * kc)
    _, pos = jax.lax.top_k(cand, k)  # position a * kc + b <-> key (i1[a], i2[b])
    a1 = jnp.take_along_axis(i1, pos // kc, axis=-1)
    a2 = jnp.take_along_axis(i2, pos % kc, axis=-1)
    # Recompute the selected scores from s1, s2 so gradients reach query and subkeys; same
    # fp32 sum as the candidates, so the values are bitwise those that were ranked.
    scores = jnp.take_along_axis(s1, a1, axis=-1) + jnp.take_along_axis(s2, a2, axis=-1)
    return scores, (a1 * n + a2).astype(jnp.int32)
