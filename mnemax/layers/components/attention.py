"""Attention mixers: causal grouped-query attention, full (`attention`) or in a sliding window
(`swa`), from `mnemax.layers.attention`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mnemax.layers import checkpoint_names as names
from mnemax.layers.attention import AttentionImpl, GroupedQueryAttention
from mnemax.layers.components.base import BlockContext, Component, register


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

    def param_count(self, ctx: BlockContext) -> int:
        return attention_param_count(ctx.model.d_model, self.num_heads, self.num_kv_heads,
                                     self.head_dim)

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        """6 x the projections' parameters, plus QK^T and AV: 2 matmuls x 2 FLOPs per
        multiply-add per key a query attends, x 3 for forward + backward."""
        keys = mean_keys_attended(seq_len, self.window)
        return 6.0 * self.param_count(ctx) + 12.0 * keys * self.num_heads * self.head_dim


register(AttentionMixer, "attention", "swa")
