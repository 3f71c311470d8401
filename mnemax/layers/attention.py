"""Causal grouped-query attention (Ainslie et al., "GQA", 2023) with RoPE.

The score/softmax/value product is `mnemax.layers.kernels.attention.causal_attention`: splash
attention (Pallas flash attention) on TPU, the XLA path of `jax.nn.dot_product_attention`
elsewhere, by platform at lowering time (`impl` forces one).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes, checkpoint_names
from mnemax.layers.kernels.attention import AttentionImpl, causal_attention
from mnemax.layers.rope import apply_rope

__all__ = ["AttentionImpl", "GroupedQueryAttention"]


# Logical axes of q `[batch, time, heads, head_dim]` and of k, v (kv_heads).
Q_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None)
KV_AXES = (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_KV_HEADS, None)


def kernel_spec(logical: tuple[str | None, ...]) -> jax.sharding.PartitionSpec | None:
    """The mesh axes the active logical rules give `logical`, for the attention kernel's
    `shard_map`; None without a mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return nn.logical_to_mesh_axes(logical)


class GroupedQueryAttention(nn.Module):
    """Multi-head causal self-attention with `num_kv_heads` shared key/value heads.

    Input `[batch, time, embed]` -> (output `[batch, time, embed]`, aux metrics: none here).
    `num_heads` query heads: the model's heads, or fewer with sparse query attention (SQA).
    Parameters: `q: [embed, heads, head_dim]`, `k`, `v: [embed, kv_heads, head_dim]`,
    `o: [heads, head_dim, embed]`.
    Tags for remat policies: `attn_q`, `attn_k`, `attn_v` (projections, before RoPE) and
    `attn_out` (`[batch, time, heads, head_dim]`, before the output projection; splash's own
    residuals, its output and log-sum-exp, carry the same name, so saving `attn_out` also
    spares the backward pass a rerun of the forward kernel).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    impl: AttentionImpl = "auto"  # auto | xla | cudnn | splash (see kernels/attention/op.py)
    window: int | None = None  # sliding window (tokens, itself included); None = full causal

    def project(self, x: jax.Array, name: str, heads: int, heads_axis: str) -> jax.Array:
        """`[batch, time, embed]` -> `[batch, time, heads, head_dim]` by the parameter `name`
        `[embed, heads, head_dim]` (called inside `__call__`; subclasses reuse it)."""
        kernel = self.param(
            name,
            nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), (axes.EMBED, heads_axis, axes.HEAD_DIM)
            ),
            (x.shape[-1], heads, self.head_dim),
        )
        return jax.numpy.einsum("bte,ehd->bthd", x, kernel.astype(x.dtype))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array,
               positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The attention itself on RoPE'd q `[batch, time, heads, head_dim]` and k, v
        `[batch, time, kv_heads, head_dim]` -> (`[batch, time, heads, head_dim]`, aux metrics);
        `x` is the layer's input. Subclasses with another attention (MoBA) override this."""
        out = causal_attention(q, k, v, window=self.window, impl=self.impl,
                               spec=kernel_spec(Q_AXES), residual_name=checkpoint_names.ATTN_OUT)
        return out, {}

    def output(self, out: jax.Array, embed: int) -> jax.Array:
        """`[batch, time, heads, head_dim]` -> `[batch, time, embed]` by the parameter `o`."""
        out = checkpoint_name(out, checkpoint_names.ATTN_OUT)
        o_kernel = self.param(
            "o",
            nn.with_logical_partitioning(
                nn.initializers.normal(self.out_init_std), (axes.HEADS, axes.HEAD_DIM, axes.EMBED)
            ),
            (self.num_heads, self.head_dim, embed),
        )
        return jax.numpy.einsum("bthd,hde->bte", out, o_kernel.astype(out.dtype))

    @nn.compact
    def __call__(self, x: jax.Array,
                 positions: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        q = self.project(x, "q", self.num_heads, axes.HEADS)
        k = self.project(x, "k", self.num_kv_heads, axes.KV_HEADS)
        v = self.project(x, "v", self.num_kv_heads, axes.KV_HEADS)
        q = nn.with_logical_constraint(q, Q_AXES)
        k = nn.with_logical_constraint(k, KV_AXES)
        v = nn.with_logical_constraint(v, KV_AXES)
        q = checkpoint_name(q, checkpoint_names.ATTN_Q)
        k = checkpoint_name(k, checkpoint_names.ATTN_K)
        v = checkpoint_name(v, checkpoint_names.ATTN_V)
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        out, aux = self.attend(q, k, v, x, positions)
        return self.output(out, x.shape[-1]), aux
