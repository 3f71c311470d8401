"""Causal grouped-query attention (Ainslie et al., "GQA", 2023) with RoPE.

The score/softmax/value product goes through `jax.nn.dot_product_attention`, which picks cuDNN
flash attention on GPU when the shapes allow and XLA elsewhere.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes, checkpoint_names
from mnemax.layers.rope import apply_rope

AttentionImpl = Literal["auto", "xla", "cudnn"]


class GroupedQueryAttention(nn.Module):
    """Multi-head causal self-attention with `num_kv_heads` shared key/value heads.

    Input `[batch, time, embed]` -> output `[batch, time, embed]`.
    Parameters: `q: [embed, heads, head_dim]`, `k`, `v: [embed, kv_heads, head_dim]`,
    `o: [heads, head_dim, embed]`.
    Tags for remat policies: `attn_q`, `attn_k`, `attn_v` (projections, before RoPE) and
    `attn_out` (`[batch, time, heads, head_dim]`, before the output projection).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    impl: AttentionImpl = "auto"
    window: int | None = None  # sliding window (tokens, itself included); None = full causal

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        embed = x.shape[-1]

        def proj(name: str, heads: int, heads_axis: str) -> jax.Array:
            kernel = self.param(
                name,
                nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), (axes.EMBED, heads_axis, axes.HEAD_DIM)
                ),
                (embed, heads, self.head_dim),
            )
            return jax.numpy.einsum("bte,ehd->bthd", x, kernel.astype(x.dtype))

        q = proj("q", self.num_heads, axes.HEADS)
        k = proj("k", self.num_kv_heads, axes.KV_HEADS)
        v = proj("v", self.num_kv_heads, axes.KV_HEADS)
        q_axes = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None)
        kv_axes = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None)
        q = nn.with_logical_constraint(q, q_axes)
        k = nn.with_logical_constraint(k, kv_axes)
        v = nn.with_logical_constraint(v, kv_axes)
        q = checkpoint_name(q, checkpoint_names.ATTN_Q)
        k = checkpoint_name(k, checkpoint_names.ATTN_K)
        v = checkpoint_name(v, checkpoint_names.ATTN_V)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        impl = None if self.impl == "auto" else self.impl
        local = None if self.window is None else (self.window - 1, 0)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                           local_window_size=local)
        out = checkpoint_name(out, checkpoint_names.ATTN_OUT)
        o_kernel = self.param(
            "o",
            nn.with_logical_partitioning(
                nn.initializers.normal(self.out_init_std), (axes.HEADS, axes.HEAD_DIM, axes.EMBED)
            ),
            (self.num_heads, self.head_dim, embed),
        )
        return jax.numpy.einsum("bthd,hde->bte", out, o_kernel.astype(x.dtype))
