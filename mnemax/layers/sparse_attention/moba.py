"""MoBA: Mixture of Block Attention (Lu et al. 2025, "MoBA: Mixture of Block Attention for
Long-Context LLMs"), on the block-sparse attention op.

Keys are cut into blocks of B tokens. The gate score of query t (head h) for block j is
`s_t[j] = q_t . mean(K_j)` (Sec. 2.2: `s_i = <q, mean_pool(K[I_i])>`, here with the keys of h's
GQA kv head); query t attends causally to its own block and to the `topk` strictly earlier
blocks of highest score (Sec. 2.2's gate `g_i = 1` for the top-k `s_i`, with causality: the
current block is always selected, blocks after it never), to all earlier blocks when there are
fewer than `topk`. No parameters beyond the dense layer's:
`MoBAAttention` is `GroupedQueryAttention` (q, k, v, o, RoPE) with its `attend` replaced.

Mapped to the op per (query group i, head h), a group being `query_block` consecutive tokens
(default: the key block): the list is the union over the group's tokens of their choices and
their own block, each token's own choices its row of the slot mask (the own block always on,
causal inside it). The gate runs on the RoPE'd q and k, as MoBA's code does (it
replaces the attention function that Hugging Face calls after the rotary embedding), in fp32,
and under `stop_gradient`: the selection is discrete and MoBA's code uses the gate only for its
top-k indices and masks, so no gradient reaches q or k through it there either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from mnemax.layers.attention import Q_AXES, GroupedQueryAttention, kernel_spec
from mnemax.layers.kernels.block_sparse_attention import block_sparse_attention
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.dispatch import Impl
from mnemax.layers.sparse_attention.config import MoBAConfig

DROPPED = "moba/dropped_choices"  # aux metric: fraction of earlier-block choices not read


def block_means(k: jax.Array, block_size: int) -> jax.Array:
    """Mean key of each block, fp32: `[batch, T, kv_heads, d]` -> `[batch, n, kv_heads, d]`
    (the ragged last block averages its own tokens, as MoBA's `moba_attn_varlen_naive`)."""
    batch, seq_len, kv_heads, d = k.shape
    n = num_blocks(seq_len, block_size)
    padded = jnp.pad(k.astype(jnp.float32), [(0, 0), (0, n * block_size - seq_len), (0, 0),
                                               (0, 0)])
    sums = padded.reshape(batch, n, block_size, kv_heads, d).sum(axis=2)
    counts = jnp.minimum(block_size, seq_len - block_size * jnp.arange(n)).astype(jnp.float32)
    return sums / counts[None, :, None, None]


def token_choices(q: jax.Array, k: jax.Array, *, block_size: int, topk: int) -> jax.Array:
    """`[batch, heads, T, n]` bool: the key blocks each query reads under MoBA (its own block and
    its top-k strictly earlier blocks by q . mean(K_j)).

    q `[batch, T, heads, d]`, k `[batch, T, kv_heads, d]` (RoPE'd; no gradient flows here).
    """
    batch, seq_len, heads, _ = q.shape
    n = num_blocks(seq_len, block_size)
    means = jnp.repeat(block_means(k, block_size), heads // k.shape[2], axis=2)
    scores = jnp.einsum("bthd,bnhd->bhtn", q.astype(jnp.float32), means)
    own = jnp.arange(seq_len) // block_size
    blocks = jnp.arange(n)
    reads = jnp.broadcast_to(blocks == own[:, None], (batch, heads, seq_len, n))
    picks = min(topk, n - 1)
    if picks == 0:
        return reads
    earlier = blocks < own[:, None]  # [T, n]
    _, top = jax.lax.top_k(jnp.where(earlier, scores, -jnp.inf), picks)  # [b, h, T, picks]
    # With fewer than `picks` earlier blocks the top-k also returns later (or own) blocks at
    # -inf: only earlier ones count.
    valid = top < own[:, None]
    chosen = jnp.any((top[..., None] == blocks) & valid[..., None], axis=-2)
    return reads | chosen


def block_lists(reads: jax.Array, *, block_size: int, slots: int,
                always: np.ndarray | None = None,
                query_block: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token block choices -> the op's inputs, one list per group of `query_block`
    consecutive tokens (None: block_size; it divides block_size).

    reads `[batch, heads, T, n]` bool (each token's own block included) -> block_indices
    `[batch, heads, nq, slots]` int32 (nq = ceil(T / query_block); the union of the group's
    choices, -1 padded; past `slots` blocks, the `always` ones first, then the most-chosen),
    slot_mask `[batch, heads, T, slots]` (token t reads slot l) and the fraction of the tokens'
    choices besides their own block that a full list left out (0 when `slots` covers every
    union). `always` `[n, n]` bool: key blocks every token of key block i reads (default: its
    own block only). Smaller groups list fewer blocks: the union is over fewer tokens.
    """
    batch, heads, seq_len, n = reads.shape
    qb = query_block or block_size
    nq = num_blocks(seq_len, qb)
    padded = jnp.pad(reads, [(0, 0), (0, 0), (0, nq * qb - seq_len), (0, 0)])
    votes = padded.reshape(batch, heads, nq, qb, n).sum(axis=3, dtype=jnp.int32)
    always = np.eye(n, dtype=bool) if always is None else always
    always = always[np.arange(nq) * qb // block_size]  # [nq, n]: the group's key block's row
    # Votes are at most Q, so Q + 1 puts the `always` blocks first; top_k keeps lower block
    # numbers first among equal priorities.
    priority = (votes + always * (qb + 1)).astype(jnp.float32)
    _, listed = jax.lax.top_k(priority, slots)  # [b, h, nq, slots]
    listed_votes = jnp.take_along_axis(votes, listed, axis=-1)
    block_indices = jnp.where(listed_votes > 0, listed, -1).astype(jnp.int32)
    per_token = jnp.repeat(block_indices, qb, axis=2)[:, :, :seq_len]
    slot_mask = jnp.take_along_axis(reads, jnp.maximum(per_token, 0), axis=-1) & (per_token >= 0)
    # Earlier-block choices: every read but the own block (one per token).
    chosen = jnp.sum(reads, dtype=jnp.int32) - batch * heads * seq_len
    kept = jnp.sum(slot_mask, dtype=jnp.int32) - batch * heads * seq_len
    dropped = (chosen - kept).astype(jnp.float32) / jnp.maximum(chosen, 1).astype(jnp.float32)
    return block_indices, slot_mask, dropped


def moba_attention(q: jax.Array, k: jax.Array, v: jax.Array, config: MoBAConfig, *,
                   impl: Impl = "auto",
                   spec: PartitionSpec | None = None) -> tuple[jax.Array, jax.Array]:
    """MoBA on RoPE'd q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]` ->
    (`[batch, T, heads, d]`, fraction of dropped choices (see `block_lists`)). `spec`: the
    mesh split of q, for the op's kernels (None: no mesh)."""
    reads = token_choices(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k),
                          block_size=config.block_size, topk=config.topk)
    block_indices, slot_mask, dropped = block_lists(
        reads, block_size=config.block_size, slots=config.slots(q.shape[1]),
        query_block=config.query_block)
    out = block_sparse_attention(q, k, v, block_indices, slot_mask,
                                 block_size=config.block_size, query_block=config.query_block,
                                 impl=impl, spec=spec)
    return out, dropped


class MoBAAttention(GroupedQueryAttention):
    """`GroupedQueryAttention` (same parameters, RoPE and remat names) whose attention is MoBA.

    Aux: `moba/dropped_choices` (0 unless `config.max_blocks` caps the lists).
    """

    config: MoBAConfig = MoBAConfig()
    sparse_impl: Impl = "auto"

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        out, dropped = moba_attention(q, k, v, self.config, impl=self.sparse_impl,
                                      spec=kernel_spec(Q_AXES))
        return out, {DROPPED: dropped}
