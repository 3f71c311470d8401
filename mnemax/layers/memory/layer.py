"""The memory layer: retrieval + value read + output, for every variant of `MemoryConfig`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers import axes
from mnemax.layers.memory.config import MemoryConfig
from mnemax.layers.memory.retrieval import ProductKeyRetrieval
from mnemax.layers.memory.values import (
    MEMORY_DIM,
    MEMORY_EXPANSION,
    MEMORY_ROWS,
    read_expanded_values,
    read_values,
    slot_statistics,
)


def value_table_init(config: MemoryConfig, value_dim: int) -> nn.initializers.Initializer:
    """N(0, std^2) with std = value_init_std or 1/sqrt(value_dim) (Lample et al.'s choice)."""
    return nn.with_logical_partitioning(
        nn.initializers.normal(config.value_init_std or value_dim**-0.5),
        (MEMORY_ROWS, MEMORY_DIM))


def value_width(config: MemoryConfig, d_model: int) -> int:
    return d_model if config.variant == "peer" else (config.value_dim or d_model)


class MemoryLayer(nn.Module):
    """`[B, T, D] -> ([B, T, D], aux)`; aux has `memory/usage` and `memory/weight_entropy`.

    pkm / ultramem: out = memory(x) (projected to D if value_dim != D).
    memory_plus or gated: out = W_o(silu(W_g x) * memory(x)).
    peer: out = sum_i g_i * up_i * gelu(down_i . x) over the retrieved experts i.
    `shared_values` is the model-level table when `config.shared`.
    """

    config: MemoryConfig

    @nn.compact
    def __call__(self, x: jax.Array, shared_values: jax.Array | None = None):
        cfg = self.config
        batch, time, d_model = x.shape
        d_v = value_width(cfg, d_model)
        weights, indices, _ = ProductKeyRetrieval(cfg, name="retrieval")(x)
        aux = slot_statistics(indices, weights, cfg.num_rows)
        flat_i = indices.reshape(batch * time, -1)
        flat_w = weights.reshape(batch * time, -1)
        flat_x = x.reshape(batch * time, d_model)

        if shared_values is not None:
            table = shared_values
        else:
            table = self.param("values", value_table_init(cfg, d_v), (cfg.physical_rows, d_v))
        table = table.astype(x.dtype)

        if cfg.variant == "peer":
            down = self.param("expert_down", value_table_init(cfg, d_model),
                              (cfg.num_rows, d_model))
            experts = jnp.take(down.astype(x.dtype), flat_i, axis=0)  # [BT, H*k, D]
            activation = jax.nn.gelu(jnp.einsum("tjd,td->tj", experts, flat_x,
                                                preferred_element_type=jnp.float32))
            out = read_values(table, flat_i, flat_w * activation, impl=cfg.impl)
            return out.reshape(batch, time, d_model).astype(x.dtype), aux

        projections = None
        if cfg.value_expansion > 1:
            projections = self.param(
                "value_projections",
                nn.with_logical_partitioning(nn.initializers.normal(d_v**-0.5),
                                             (MEMORY_EXPANSION, MEMORY_DIM, None)),
                (cfg.value_expansion, d_v, d_v),
            )
        memory = read_expanded_values(table, projections, flat_i, flat_w, impl=cfg.impl)
        memory = memory.astype(x.dtype)
        gated = cfg.gated or cfg.variant == "memory_plus"
        if gated:
            w_gate = self.param("gate", nn.with_logical_partitioning(
                nn.initializers.normal(d_model**-0.5), (axes.EMBED, MEMORY_DIM)), (d_model, d_v))
            memory = jax.nn.silu(flat_x @ w_gate.astype(x.dtype)) * memory
        if gated or d_v != d_model:
            w_out = self.param("out", nn.with_logical_partitioning(
                nn.initializers.normal(d_v**-0.5), (MEMORY_DIM, axes.EMBED)), (d_v, d_model))
            memory = memory @ w_out.astype(x.dtype)
        return memory.reshape(batch, time, d_model), aux


def memory_param_count(cfg: MemoryConfig, d_model: int, *, include_values: bool = True) -> int:
    """Parameters of one memory layer (without the shared table when `include_values` is off)."""
    d_v = value_width(cfg, d_model)
    rank = max(cfg.tucker_rank, 1)
    count = d_model * cfg.num_heads * rank * cfg.key_dim + cfg.num_heads * cfg.subkeys * cfg.key_dim
    if cfg.tucker_rank:
        count += cfg.num_heads * rank * rank
    if include_values:
        count += cfg.physical_rows * d_v
    if cfg.variant == "peer":
        return count + cfg.num_rows * d_model
    if cfg.value_expansion > 1:
        count += cfg.value_expansion * d_v * d_v
    gated = cfg.gated or cfg.variant == "memory_plus"
    if gated:
        count += d_model * d_v
    if gated or d_v != d_model:
        count += d_v * d_model
    return count


def memory_flops_per_token(cfg: MemoryConfig, d_model: int) -> float:
    """Training FLOPs per token of one memory layer (3x the forward multiply-adds x 2)."""
    d_v = value_width(cfg, d_model)
    rank = max(cfg.tucker_rank, 1)
    reads = cfg.num_heads * cfg.topk
    forward = d_model * cfg.num_heads * rank * cfg.key_dim  # query
    forward += cfg.num_heads * cfg.subkeys * cfg.key_dim * rank  # sub-key scores
    forward += cfg.num_heads * cfg.topk**2 * rank * rank if cfg.tucker_rank else 0
    if cfg.variant == "peer":
        forward += 2 * reads * d_model
    else:
        forward += reads * d_v * cfg.value_expansion + cfg.value_expansion * d_v * d_v * (
            cfg.value_expansion > 1)
        gated = cfg.gated or cfg.variant == "memory_plus"
        forward += d_model * d_v * (int(gated) + int(gated or d_v != d_model))
    return 6.0 * forward
