"""The sparse attention mixers `moba` and `nsa` (`mnemax.layers.sparse_attention`) as block
components, configured by `model.sparse_attention`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mnemax.layers import checkpoint_names as names
from mnemax.layers.components.attention import attention_param_count
from mnemax.layers.components.base import BlockContext, Component, register
from mnemax.layers.kernels.dispatch import Impl
from mnemax.layers.sparse_attention import moba, nsa
from mnemax.layers.sparse_attention.config import MoBAConfig, NSAConfig

ATTN_NAMES = (names.ATTN_Q, names.ATTN_K, names.ATTN_V, names.ATTN_OUT)


def score_flops(keys: float, heads: int, head_dim: int) -> float:
    """Training FLOPs per token of QK^T and AV over `keys` keys: 2 matmuls x 2 FLOPs per
    multiply-add x 3 for forward + backward."""
    return 12.0 * keys * heads * head_dim


@dataclasses.dataclass(frozen=True)
class MoBAMixer(Component):
    """MoBA: the dense layer's parameters, attention over the own block and the top-k earlier
    blocks by q . mean(K_block)."""

    kind: ClassVar[str] = "mixer"
    name: ClassVar[str] = "moba"
    module_name: ClassVar[str] = "attn"
    remat_names: ClassVar[tuple[str, ...]] = ATTN_NAMES
    aux_keys: ClassVar[tuple[str, ...]] = (moba.DROPPED,)

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    init_std: float
    config: MoBAConfig
    impl: Impl = "auto"

    @classmethod
    def for_block(cls, model: Any, layer: int) -> MoBAMixer:
        return cls(num_heads=model.q_heads, num_kv_heads=model.kv_heads,
                   head_dim=model.dim_per_head, rope_theta=model.rope_theta,
                   init_std=model.init_std, config=model.sparse.moba, impl=model.sparse.impl)

    def validate(self, model: Any) -> None:
        self.config.validate()

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        module = moba.MoBAAttention(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, init_std=self.init_std, out_init_std=ctx.out_init_std,
            config=self.config, sparse_impl=self.impl, name=self.module_name)
        return module(x, positions)

    def param_count(self, ctx: BlockContext) -> int:
        return attention_param_count(ctx.model.d_model, self.num_heads, self.num_kv_heads,
                                     self.head_dim)

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        """6 x the projections' parameters plus the scores over every key of the listed blocks
        (`MoBAConfig.keys_read`: the op computes whole blocks), not counting the gate's
        O(T / B) dot products per query (no gradient)."""
        return (6.0 * self.param_count(ctx)
                + score_flops(self.config.keys_read(seq_len), self.num_heads, self.head_dim))


@dataclasses.dataclass(frozen=True)
class NSAMixer(Component):
    """NSA: compressed, selected and sliding-window branches mixed by per-head gates."""

    kind: ClassVar[str] = "mixer"
    name: ClassVar[str] = "nsa"
    module_name: ClassVar[str] = "attn"
    remat_names: ClassVar[tuple[str, ...]] = ATTN_NAMES
    aux_keys: ClassVar[tuple[str, ...]] = (nsa.DROPPED,)

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    init_std: float
    config: NSAConfig
    impl: Impl = "auto"

    @classmethod
    def for_block(cls, model: Any, layer: int) -> NSAMixer:
        return cls(num_heads=model.q_heads, num_kv_heads=model.kv_heads,
                   head_dim=model.dim_per_head, rope_theta=model.rope_theta,
                   init_std=model.init_std, config=model.sparse.nsa, impl=model.sparse.impl)

    def validate(self, model: Any) -> None:
        self.config.validate(self.head_dim)

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        module = nsa.NSAAttention(
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, init_std=self.init_std, out_init_std=ctx.out_init_std,
            config=self.config, sparse_impl=self.impl, name=self.module_name)
        return module(x, positions)

    def compression_params(self) -> int:
        """One compression MLP (Eq. 7): position embedding [l, d], [l d, hidden] + bias,
        [hidden, d] + bias."""
        cfg, d = self.config, self.head_dim
        hidden = cfg.hidden(d)
        return cfg.compress_block * d + (cfg.compress_block * d + 1) * hidden + (hidden + 1) * d

    def param_count(self, ctx: BlockContext) -> int:
        """q, o, three (k, v) pairs, two compression MLPs, the gate [D, H, 3] and its bias."""
        d_model, h, kv, d = ctx.model.d_model, self.num_heads, self.num_kv_heads, self.head_dim
        projections = d_model * d * (2 * h + 6 * kv)
        return projections + 2 * self.compression_params() + (d_model + 1) * h * 3

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        """6 x the parameters used once per token (projections, gate) plus, per token, the
        compression MLPs (each compressed token's MLP, nc / T of them per token), the cmp
        scores over every compressed token (dense) and the slc and win scores over every key
        of their listed blocks (`NSAConfig.keys_read`). The selection scores' Eq. 9 sums are not
        counted (no gradient, O(T / d) adds)."""
        cfg, d = self.config, self.head_dim
        per_token = self.param_count(ctx) - 2 * self.compression_params()
        mlp = 2 * (self.compression_params() - cfg.compress_block * d) * self.num_kv_heads
        mlp_per_token = mlp * cfg.compressed_tokens(seq_len) / seq_len
        keys = cfg.mean_compressed_read(seq_len) + cfg.keys_read(seq_len)
        return (6.0 * (per_token + mlp_per_token)
                + score_flops(keys, self.num_heads, self.head_dim))


register(MoBAMixer)
register(NSAMixer)
