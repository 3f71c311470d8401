"""The gathered-block XLA path of block-sparse attention (`impl="reference"`, and "auto" until a
kernel is measured faster).

For each query group i (`query_block` = Q tokens) of head h the `L` listed key blocks of its kv
head are gathered, `keys[b, h, i] = k[b, block_indices[b, h, i, l] * B + c, h // group]` for
slots l and offsets c (`[batch, heads, nq, L * B, d]`), and the group attends to those `L * B`
keys only, under the slot mask, causality, the window, and the end of the sequence (the ragged
last group and block are padded and their padding masked). Scores and softmax are fp32; a query
that sees no key gets zeros.

Memory and FLOPs grow with `T * L * B` (never `T^2`). The query groups are processed
`query_blocks_per_step` at a time (a `lax.scan`) under `jax.checkpoint`, so the backward pass
recomputes a step's scores instead of keeping all of them: the live scores are those of one
step. Gradients are autodiff's (the gather's transpose is a scatter-add into k and v).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks

# Score elements one step may hold ([batch, heads, steps' query groups, Q, L * B], fp32): 32 M
# elements is 128 MiB per array; a step's softmax keeps a few such arrays alive.
SCORE_ELEMENTS_PER_STEP = 1 << 25



def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax of fp32 `scores` over the last axis, over the `visible` entries only; a row with
    none visible is all zeros (and passes no gradient)."""
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    return weights / jnp.where(denom > 0, denom, 1.0)

def default_query_blocks_per_step(batch: int, heads: int, n: int, block_size: int,
                                  slots: int, query_block: int | None = None) -> int:
    """Query groups per step so that one step's scores stay within `SCORE_ELEMENTS_PER_STEP`."""
    per_block = batch * heads * (query_block or block_size) * slots * block_size
    return max(1, min(n, SCORE_ELEMENTS_PER_STEP // per_block))


def _blocks(x: jax.Array, n: int, block_size: int) -> jax.Array:
    """`[batch, T, heads, d]` -> `[batch, heads, n, B, d]`, the time axis zero-padded to n * B."""
    batch, seq_len, heads, d = x.shape
    x = jnp.pad(x, [(0, 0), (0, n * block_size - seq_len), (0, 0), (0, 0)])
    return x.reshape(batch, n, block_size, heads, d).transpose(0, 3, 1, 2, 4)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
              slot_mask: jax.Array, *, block_size: int, window: int | None, scale: float,
              query_blocks_per_step: int | None = None,
              query_block: int | None = None) -> jax.Array:
    """Block-sparse attention by gathering the listed key blocks (the op's semantics: see
    `masked_reference.py`).

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]`, block_indices
    `[batch, heads, nq, L]` int32 (-1 unused; nq = ceil(T / query_block), query_block None =
    block_size), slot_mask `[batch, heads, T, L]` bool -> `[batch, T, heads, d]` in q's dtype.
    Inputs are assumed checked (`op.py`).
    """
    batch, seq_len, heads, d = q.shape
    group = heads // k.shape[2]
    slots = block_indices.shape[-1]
    bs, qs = block_size, query_block or block_size
    n, nq = num_blocks(seq_len, bs), num_blocks(seq_len, qs)
    step = min(nq, query_blocks_per_step or default_query_blocks_per_step(
        batch, heads, nq, bs, slots, qs))
    steps = -(-nq // step)
    n_pad = steps * step  # query groups padded to whole steps: no keys listed, output dropped

    kb, vb = _blocks(k, n, bs), _blocks(v, n, bs)  # [batch, kv_heads, n, B, d]
    qb = _blocks(q, n_pad, qs)  # [batch, heads, n_pad, Q, d]
    idx = jnp.pad(block_indices, [(0, 0), (0, 0), (0, n_pad - nq), (0, 0)], constant_values=-1)
    mask = jnp.pad(slot_mask, [(0, 0), (0, 0), (0, n_pad * qs - seq_len), (0, 0)])
    mask = mask.reshape(batch, heads, n_pad, qs, slots)
    b_ix = jnp.arange(batch)[:, None, None, None]
    kv_ix = (jnp.arange(heads) // group)[None, :, None, None]

    def one_step(xs):
        q_s, idx_s, mask_s, first = xs  # [batch, heads, step, ...]; first query group of step
        safe = jnp.maximum(idx_s, 0)
        keys = kb[b_ix, kv_ix, safe]  # [batch, heads, step, L, B, d]
        values = vb[b_ix, kv_ix, safe]
        scores = jnp.einsum("bhiqd,bhilkd->bhiqlk", q_s, keys,
                            preferred_element_type=jnp.float32) * scale
        q_pos = ((first + jnp.arange(step)) * qs)[:, None] + jnp.arange(qs)  # [step, Q]
        k_pos = safe[..., None] * bs + jnp.arange(bs)  # [batch, heads, step, L, B]
        q_pos = q_pos[:, :, None, None]
        k_pos = k_pos[:, :, :, None]
        visible = ((idx_s >= 0)[:, :, :, None, :, None] & mask_s[..., None]
                   & (k_pos <= q_pos) & (k_pos < seq_len))
        if window is not None:
            visible &= k_pos > q_pos - window
        shape = (*scores.shape[:4], slots * bs)
        scores, visible = scores.reshape(shape), visible.reshape(shape)
        probs = masked_softmax(scores, visible)
        values = values.reshape((*values.shape[:3], slots * bs, d))
        out = jnp.einsum("bhiqs,bhisd->bhiqd", probs, values.astype(jnp.float32))
        return out.astype(q.dtype)

    if steps == 1:
        out = one_step((qb, idx, mask, 0))
    else:
        # [steps, batch, heads, step, ...]: a scan walks the steps; checkpoint keeps the
        # backward pass from storing every step's scores.
        split = lambda x: jnp.moveaxis(x.reshape((*x.shape[:2], steps, step, *x.shape[3:])), 2, 0)
        body = jax.checkpoint(one_step)
        _, outs = jax.lax.scan(lambda carry, xs: (carry, body(xs)), None,
                               (split(qb), split(idx), split(mask), jnp.arange(steps) * step),
                               unroll=dispatch.loop_unroll())
        out = jnp.moveaxis(outs, 0, 2).reshape(batch, heads, n_pad, qs, d)
    out = out.transpose(0, 2, 3, 1, 4).reshape(batch, n_pad * qs, heads, d)
    return out[:, :seq_len]
