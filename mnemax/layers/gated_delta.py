"""Gated DeltaNet token mixer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks", ICLR 2025).

x -> q, k, v projections -> short causal depthwise conv + SiLU -> L2-normalised q, k ->
beta = sigmoid(W_b x), g = -exp(A_log) * softplus(W_a x + dt_bias) (Mamba2's decay) -> the gated
delta rule (`mnemax.layers.kernels.gated_delta`) -> per-head RMSNorm * silu(W_z x) -> W_o.
With more value heads than key heads, each key head serves a group of value heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from mnemax.errors import ConfigError, check_choices
from mnemax.layers import axes, checkpoint_names
from mnemax.layers.kernels.gated_delta import gated_delta_rule, impl_and_form
from mnemax.layers.primitives import l2_normalize, rms_normalize

CONV = "conv"

# What runs the gated delta rule: the keys of mnemax.layers.kernels.gated_delta.CONFIG_IMPLS.
GatedDeltaImpl = Literal["auto", "chunk", "recurrent", "reference", "pallas", "pallas_interpret"]
GATED_DELTA_PATH = "model.gated_delta"  # where a recipe holds the config; errors name keys under it


@dataclasses.dataclass(frozen=True)
class GatedDeltaConfig:
    """Shape of a Gated DeltaNet mixer."""

    num_heads: int = 4  # key (and query) heads
    num_value_heads: int | None = None  # value heads (>= num_heads, a multiple); None = num_heads
    head_dim: int = 64  # key/query width per head
    value_head_dim: int | None = None  # value width per head; None = head_dim
    conv_size: int = 4  # causal depthwise conv width on q, k and v
    chunk_size: int = 64  # tokens per chunk of the chunkwise-parallel form
    norm_eps: float = 1e-6  # output RMSNorm epsilon
    impl: GatedDeltaImpl = "auto"  # see gated_delta_rule

    def __post_init__(self) -> None:
        check_choices(self, GATED_DELTA_PATH)

    @property
    def value_heads(self) -> int:
        return self.num_value_heads or self.num_heads

    @property
    def value_dim(self) -> int:
        return self.value_head_dim or self.head_dim

    def validate(self) -> None:
        """Raises ConfigError naming the field (by its override path) that cannot build a
        mixer."""
        check_choices(self, GATED_DELTA_PATH)
        if self.value_heads % self.num_heads:
            raise ConfigError(
                f"{GATED_DELTA_PATH}.num_value_heads={self.value_heads} is not a multiple of "
                f"{GATED_DELTA_PATH}.num_heads={self.num_heads}: each key head serves a whole "
                "group of value heads")

    def param_count(self, d_model: int) -> int:
        hk, hv = self.num_heads * self.head_dim, self.value_heads * self.value_dim
        projections = d_model * (2 * hk + 2 * hv) + hv * d_model  # q, k, v, z, o
        return (projections + self.conv_size * (2 * hk + hv) + 2 * d_model * self.value_heads
                + 2 * self.value_heads + self.value_dim)

    def flops_per_token(self, d_model: int) -> float:
        """Training FLOPs per token: projections plus the chunk form's intra-chunk products and
        state updates (approximate: 3x the forward)."""
        hk, hv = self.num_heads * self.head_dim, self.value_heads * self.value_dim
        matmul = d_model * (2 * hk + 2 * hv + 2 * self.value_heads) + hv * d_model
        per_head = self.chunk_size * (self.head_dim + self.value_dim) + 4 * self.head_dim * (
            self.value_dim)
        return 6.0 * matmul + 6.0 * self.value_heads * per_head


class GatedDeltaCache(flax.struct.PyTreeNode):
    """Decoding state: the last `conv_size - 1` pre-conv inputs and the recurrent state."""

    conv: jax.Array  # [batch, conv_size - 1, channels of q, k, v]
    state: jax.Array  # [batch, value_heads, head_dim, value_dim], fp32


def init_cache(config: GatedDeltaConfig, batch: int, dtype=jnp.float32) -> GatedDeltaCache:
    channels = 2 * config.num_heads * config.head_dim + config.value_heads * config.value_dim
    return GatedDeltaCache(
        conv=jnp.zeros((batch, config.conv_size - 1, channels), dtype),
        state=jnp.zeros((batch, config.value_heads, config.head_dim, config.value_dim),
                        jnp.float32),
    )


def _rule_spec() -> PartitionSpec | None:
    """How the active logical rules split the rule's `[batch, time, heads, d]`, for its
    `shard_map`; None without a mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return nn.logical_to_mesh_axes((axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """Mamba2's init: softplus(dt_bias) log-uniform in [1e-3, 1e-1]."""
    dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(0.1) - math.log(1e-3))
                 + math.log(1e-3))
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, minval=1.0, maxval=16.0)).astype(dtype)


class GatedDeltaNet(nn.Module):
    """`[batch, time, embed] -> [batch, time, embed]`.

    Without `cache` the whole sequence is mixed by the chunkwise-parallel op (with a mesh in
    context, per device inside `shard_map`: batch and heads split as the logical rules split the
    activations); with a cache (decoding) the recurrence continues from it and the updated cache
    is returned.
    Tags for remat policies: `gdn_qkv` (`[batch, time, 2 hk + hv]`, the projections before the
    conv) and `gdn_out` (`[batch, time, value_heads, value_dim]`, the op's output).
    """

    config: GatedDeltaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: GatedDeltaCache | None = None):
        cfg = self.config
        batch, time, d_model = x.shape
        hk, hv = cfg.num_heads * cfg.head_dim, cfg.value_heads * cfg.value_dim
        init = nn.initializers.normal(d_model**-0.5)

        def dense(name: str, features: int, out_axis: str, std_init=init) -> jax.Array:
            kernel = self.param(
                name, nn.with_logical_partitioning(std_init, (axes.EMBED, out_axis)),
                (d_model, features))
            return x @ kernel.astype(x.dtype)

        qkv = jnp.concatenate([dense("q", hk, axes.HEADS), dense("k", hk, axes.HEADS),
                               dense("v", hv, axes.HEADS)], axis=-1)
        qkv = checkpoint_name(qkv, checkpoint_names.GDN_QKV)
        conv_w = self.param("conv", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.conv_size**-0.5), (CONV, axes.HEADS)),
            (cfg.conv_size, qkv.shape[-1]))
        history = (cache.conv.astype(x.dtype) if cache is not None else
                   jnp.zeros((batch, cfg.conv_size - 1, qkv.shape[-1]), x.dtype))
        padded = jnp.concatenate([history, qkv], axis=1)
        conv = sum(padded[:, i:i + time] * conv_w[i].astype(x.dtype) for i in range(cfg.conv_size))
        conv = jax.nn.silu(conv)
        q, k, v = jnp.split(conv, [hk, 2 * hk], axis=-1)
        q = l2_normalize(q.reshape(batch, time, cfg.num_heads, cfg.head_dim))
        k = l2_normalize(k.reshape(batch, time, cfg.num_heads, cfg.head_dim))
        v = v.reshape(batch, time, cfg.value_heads, cfg.value_dim)
        group = cfg.value_heads // cfg.num_heads
        if group > 1:
            q, k = jnp.repeat(q, group, axis=2), jnp.repeat(k, group, axis=2)

        beta = jax.nn.sigmoid(dense("beta", cfg.value_heads, axes.HEADS).astype(jnp.float32))
        a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, (axes.HEADS,)),
                           (cfg.value_heads,))
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_dt_bias_init, (axes.HEADS,)),
                             (cfg.value_heads,))
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            dense("decay", cfg.value_heads, axes.HEADS).astype(jnp.float32)
            + dt_bias.astype(jnp.float32))

        if cache is None:
            impl, form = impl_and_form(cfg.impl)
            o, _ = gated_delta_rule(q, k, v, g, beta, chunk_size=cfg.chunk_size, impl=impl,
                                    form=form, spec=_rule_spec())
            new_cache = None
        else:
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=cache.state,
                                        output_final_state=True, impl="reference",
                                        form="recurrent")
            new_cache = GatedDeltaCache(conv=padded[:, -(cfg.conv_size - 1):].astype(
                cache.conv.dtype), state=state)

        o = checkpoint_name(o, checkpoint_names.GDN_OUT)
        norm_scale = self.param("norm", nn.with_logical_partitioning(
            nn.initializers.ones, (axes.NORM,)), (cfg.value_dim,))
        o = rms_normalize(o, cfg.norm_eps, norm_scale).astype(x.dtype).reshape(batch, time, hv)
        o = o * jax.nn.silu(dense("z", hv, axes.HEADS))
        w_o = self.param("o", nn.with_logical_partitioning(init, (axes.HEADS, axes.EMBED)),
                         (hv, d_model))
        return o @ w_o.astype(x.dtype), new_cache
