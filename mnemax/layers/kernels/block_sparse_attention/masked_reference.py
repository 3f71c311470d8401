"""The definition of block-sparse attention: dense attention under the mask the block lists and
the per-token slot mask describe. O(T^2) memory and FLOPs; the independent reference the block
paths and kernels are tested against, never a training path.

Semantics (shared by every implementation of the op):
- Keys are cut into blocks of `block_size` tokens, queries into groups of `query_block` tokens
  (default `block_size`; it divides `block_size`); the last block and group may be ragged.
- `block_indices[b, h, i, l]` is the l-th key block listed for query group i of q head h
  (`-1` for an unused slot). The valid entries of one list are distinct.
- `slot_mask[b, h, t, l]` says whether query t reads the block in slot l of its query group's
  list (None: every query reads every listed block). This maps per-token selections (MoBA, NSA)
  exactly: a query group's list is the union of its tokens' choices, and each token's own
  choice is its row of the mask. Smaller groups list fewer blocks (NSA: a group of 16 tokens
  rather than a 64-token block, as the paper's kernel loads per query position, Sec. 3.4).
- Inside a block a query reads key s only if `s <= t` (causal) and, with `window`, `s > t -
  window` (the window counts the query itself).
- q head n reads kv head `n // (heads / kv_heads)` (GQA).
- A query that reads no key at all gets a zero output (and zero gradients).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks of `block_size` covering `seq_len` tokens, the last one possibly ragged."""
    return -(-seq_len // block_size)


def visible_keys(block_indices: jax.Array, slot_mask: jax.Array | None, seq_len: int,
                 block_size: int, window: int | None = None,
                 query_block: int | None = None) -> jax.Array:
    """`[batch, heads, T, T]` bool: whether query t reads key s under the op's semantics.

    block_indices `[batch, heads, ceil(T / query_block), L]` int, slot_mask `[batch, heads, T,
    L]` bool or None; query_block None means block_size.
    """
    n = num_blocks(seq_len, block_size)
    t = jnp.arange(seq_len)
    # Each query's own list: [b, h, T, L].
    lists = jnp.repeat(block_indices, query_block or block_size, axis=2)[:, :, :seq_len]
    chosen = lists >= 0 if slot_mask is None else (lists >= 0) & slot_mask
    # read_block[b, h, t, j]: query t reads key block j through some slot.
    read_block = jnp.any((lists[..., None] == jnp.arange(n)) & chosen[..., None], axis=-2)
    read = jnp.repeat(read_block, block_size, axis=-1)[..., :seq_len]
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    return read & allowed


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                     slot_mask: jax.Array | None = None, *, block_size: int,
                     window: int | None = None, scale: float | None = None,
                     query_block: int | None = None) -> jax.Array:
    """Block-sparse attention computed densely (see the module docstring).

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]`, block_indices `[batch, heads,
    ceil(T / query_block), L]` -> `[batch, T, heads, d]` in q's dtype; scores and softmax in
    fp32.
    """
    _, seq_len, heads, d = q.shape
    group = heads // k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    kh = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    vh = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kh) * scale
    visible = visible_keys(block_indices, slot_mask, seq_len, block_size, window, query_block)
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - jax.lax.stop_gradient(row_max)), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhts,bshd->bthd", probs, vh)
    return out.astype(q.dtype)
