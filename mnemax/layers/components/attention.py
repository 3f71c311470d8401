"""Attention mixers: causal grouped-query attention, full (`attention`) or in a sliding window
(`swa`), from `mnemax.layers.attention`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mnemax.layers import axes
from mnemax.layers import checkpoint_names as names
from mnemax.layers.attention import AttentionImpl, GroupedQueryAttention
from mnemax.layers.components.base import BlockContext, Component, register
from mnemax.layers.kernels.attention.reference import QUERY_BLOCK
from mnemax.layers.kernels.attention.splash import block_size
from mnemax.layers.rope import apply_rope


def attention_param_count(d_model: int, num_heads: int, num_kv_heads: int,
                          head_dim: int) -> int:
    """q, o: [d_model, heads, head_dim]; k, v: [d_model, kv_heads, head_dim]."""
    return d_model * head_dim * (2 * num_heads + 2 * num_kv_heads)


def mean_keys_attended(seq_len: int, window: int | None = None) -> float:
    """Keys a causal query attends, averaged over positions t = 0..seq_len-1: t + 1, or
    min(t + 1, window) in a sliding window (the window counts the query itself)."""
    w = seq_len if window is None else min(window, seq_len)
    # Positions t < w see t + 1 keys; the seq_len - w later ones see w each.
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def sliding_window_block(seq_len: int) -> int:
    """The block size the sliding-window attention ops tile a sequence by: splash's (the
    largest of 512, 256, 128 dividing it), else the XLA path's 512-query blocks."""
    return block_size(seq_len) or QUERY_BLOCK


def mean_keys_read(seq_len: int, window: int, block: int) -> float:
    """Keys a sliding-window query's block reads, averaged over positions: the attention ops
    tile queries and keys in `block`-row blocks and compute every key block that holds a key
    some query of the block sees (keys `[start - window + 1, end)` for queries `[start, end)`),
    masked entries included. A sequence of one block reads every key, as the ops do."""
    total = 0
    for start in range(0, seq_len, block):
        end = min(start + block, seq_len)
        first_block = max(0, start - window + 1) // block
        keys = end - first_block * block  # whole key blocks up to the query block's end
        total += keys * (end - start)
    return total / seq_len


class KVCache(flax.struct.PyTreeNode):
    """Keys (after RoPE) and values of every position decoded so far, `[batch, max_len,
    kv_heads, head_dim]`; positions not yet written hold zeros and are masked out."""

    k: jax.Array
    v: jax.Array


class CachedAttention(GroupedQueryAttention):
    """The same attention (parameters `q`, `k`, `v`, `o`) over a KV cache: `x` `[batch, t,
    embed]` at absolute `positions` `[t]` (contiguous) -> (`[batch, t, embed]`, new cache).

    Keys of the new tokens are written at their positions; query i sees cached positions
    <= its own (and > its own - window in a sliding window), as the causal mask of the full
    forward, so its output equals the full forward's at that position.
    """

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: KVCache) -> tuple[jax.Array, KVCache]:
        q = apply_rope(self.project(x, "q", self.num_heads, axes.HEADS), positions,
                       self.rope_theta)
        k = apply_rope(self.project(x, "k", self.num_kv_heads, axes.KV_HEADS), positions,
                       self.rope_theta)
        v = self.project(x, "v", self.num_kv_heads, axes.KV_HEADS)
        start = positions[0]
        cache = KVCache(
            k=jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, 1),
            v=jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, 1))
        batch, time, heads, dim = q.shape
        group = heads // self.num_kv_heads
        q = q.reshape(batch, time, self.num_kv_heads, group, dim)
        scores = jnp.einsum("btkgd,blkd->bkgtl", q, cache.k.astype(q.dtype),
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(dim))
        key_pos = jnp.arange(cache.k.shape[1])
        seen = key_pos[None, :] <= positions[:, None]  # [t, max_len]
        if self.window is not None:
            seen &= key_pos[None, :] > positions[:, None] - self.window
        weights = jax.nn.softmax(jnp.where(seen, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bkgtl,blkd->btkgd", weights.astype(q.dtype), cache.v.astype(q.dtype))
        return self.output(out.reshape(batch, time, heads, dim), x.shape[-1]), cache


@dataclasses.dataclass(frozen=True)
class AttentionMixer(Component):
    """Causal GQA with RoPE; `window` tokens (itself included) for sliding-window attention.

    `num_heads` is the query heads: the model's `num_heads`, or `model.query_heads` with sparse
    query attention ("Sparse Query Attention", 2025: fewer query heads than the model's heads,
    each still d_model / num_heads wide, so q, o and the score FLOPs shrink by
    query_heads / num_heads)."""

    kind: ClassVar[str] = "mixer"
    name: ClassVar[str] = "attention"
    module_name: ClassVar[str] = "attn"
    remat_names: ClassVar[tuple[str, ...]] = (names.ATTN_Q, names.ATTN_K, names.ATTN_V,
                                              names.ATTN_OUT)

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    init_std: float
    impl: AttentionImpl = "auto"
    window: int | None = None

    @classmethod
    def for_block(cls, model: Any, layer: int) -> AttentionMixer:
        window = model.sliding_window if model.mixer(layer) == "swa" else None
        return cls(num_heads=model.q_heads, num_kv_heads=model.kv_heads,
                   head_dim=model.dim_per_head, rope_theta=model.rope_theta,
                   init_std=model.init_std, impl=model.attention_impl, window=window)

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        module = GroupedQueryAttention(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, init_std=self.init_std, out_init_std=ctx.out_init_std,
            impl=self.impl, window=self.window, name=self.module_name)
        return module(x, positions)

    def init_cache(self, ctx: BlockContext, batch: int, max_len: int,
                   dtype: Any = None) -> KVCache:
        shape = (batch, max_len, self.num_kv_heads, self.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype or jnp.float32),
                       v=jnp.zeros(shape, dtype or jnp.float32))

    def decode(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
               shared: dict[str, jax.Array],
               cache: KVCache) -> tuple[jax.Array, dict[str, jax.Array], KVCache]:
        module = CachedAttention(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, init_std=self.init_std, out_init_std=ctx.out_init_std,
            window=self.window, name=self.module_name)
        out, cache = module(x, positions, cache)
        return out, {}, cache

    def param_count(self, ctx: BlockContext) -> int:
        return attention_param_count(ctx.model.d_model, self.num_heads, self.num_kv_heads,
                                     self.head_dim)

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        """6 x the projections' parameters, plus QK^T and AV: 2 matmuls x 2 FLOPs per
        multiply-add per key, x 3 for forward + backward. Keys: those a causal query attends
        (the usual count, half the square), and for a sliding window those of the blocks it
        reads (`mean_keys_read`), the work the windowed ops do."""
        keys = (mean_keys_attended(seq_len) if self.window is None
                else mean_keys_read(seq_len, self.window, sliding_window_block(seq_len)))
        return 6.0 * self.param_count(ctx) + 12.0 * keys * self.num_heads * self.head_dim


register(AttentionMixer, "attention", "swa")
