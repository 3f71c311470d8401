"""The memory layer: retrieval + value read + output, for every variant of `MemoryConfig`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes
from mnemax.layers.memory.config import MemoryConfig
from mnemax.layers.memory.initialization import (
    normal_init,
    synthetic_inputs,
    ultramemv2_init,
    weight_energy,
)
from mnemax.layers.memory.retrieval import ProductKeyRetrieval, core_rank_loss
from mnemax.layers.memory.values import (
    MEMORY_DIM,
    MEMORY_EXPANSION,
    MEMORY_ROWS,
    expanded_index,
    expert_activations,
    read_expanded_values,
    read_values,
    slot_statistics,
)

TUCKER_LOSS = "loss/memory_tucker_core"


def value_table_init(config: MemoryConfig, value_dim: int) -> nn.initializers.Initializer:
    """N(0, std^2) with std = value_init_std or 1/sqrt(value_dim) (Lample et al.'s choice)."""
    return nn.with_logical_partitioning(
        nn.initializers.normal(config.value_init_std or value_dim**-0.5),
        (MEMORY_ROWS, MEMORY_DIM))


def value_width(config: MemoryConfig, d_model: int) -> int:
    return config.value_dim or d_model


def read_width(config: MemoryConfig, d_model: int) -> int:
    """Width of what the value read returns: d_model through UltraMem's expansion projections,
    else the value width."""
    return d_model if config.value_expansion > 1 else value_width(config, d_model)


class MemoryLayer(nn.Module):
    """`[B, T, D] -> ([B, T, D], aux)`; aux has `memory/usage` and `memory/weight_entropy`, and
    with `tucker_penalty > 0` UltraMem's core penalty, weighted, as `loss/memory_tucker_core`
    (the trainer adds `loss/*` entries to the objective).

    pkm / ultramem: out = memory(x) (projected to D if value_dim != D). ultramem reads
    `value_expansion` virtual slots per physical row through one projection W_p `[D_v, D]` each
    (implicit value expansion, shuffled slots, UltraMemV2 Eq. 9; `values.read_expanded_values`)
    and weights part c of each row by Tucker core c's score (`tucker_cores`).
    memory_plus or gated: out = W_o(silu(W_g x) * memory(x)).
    peer: out = sum_i g_i * up_i * act(down_i . x') over the retrieved experts i, with
    x' = x (PEER) or x W_pre (`pre_value_dim`, UltraMemV2), act = gelu or identity, and the sum
    projected to D when value_dim != D (UltraMemV2's Eq. 15 with its single projection, Eq. 12).
    `shared_values` is the model-level table when `config.shared`.

    `num_layers` and `ffn_hidden_dim` (the model's depth, and the width of the FFN this memory
    replaces or sits beside) only set `init="ultramemv2"`'s target variance; None = the
    defaults of `initialization.ultramemv2_init`. The output is tagged `memory_out` for remat
    policies.
    """

    config: MemoryConfig
    num_layers: int | None = None
    ffn_hidden_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, shared_values: jax.Array | None = None):
        cfg = self.config
        batch, time, d_model = x.shape
        d_v = value_width(cfg, d_model)
        retrieval = ProductKeyRetrieval(cfg, name="retrieval")
        weights, indices, _ = retrieval(x)  # weights [B, T, H, C, k]
        # Raw scores (UltraMem) may be negative: usage statistics count their magnitude.
        aux = slot_statistics(indices, jnp.sum(jnp.abs(weights), axis=-2), cfg.num_rows)
        if cfg.tucker_penalty:
            cores = nn.unbox(retrieval.variables["params"]["core"])
            aux[TUCKER_LOSS] = cfg.tucker_penalty * core_rank_loss(cores, cfg.tucker_margin)
        flat_i = indices.reshape(batch * time, -1)
        # [BT, H*k, C]: slot j of head h is column h*k + j, as in flat_i.
        flat_w = jnp.swapaxes(weights, -1, -2).reshape(batch * time, flat_i.shape[1], -1)
        flat_x = x.reshape(batch * time, d_model)
        if cfg.init == "ultramemv2":
            value_std = 0.0  # only read at init
            if self.is_initializing():
                # UltraMemV2's value std depends on this retrieval's slot-weight energy.
                synthetic, _, _ = retrieval(synthetic_inputs(d_model, dtype=x.dtype))
                value_std = ultramemv2_init(cfg, d_model, weight_energy(synthetic),
                                            self.num_layers, self.ffn_hidden_dim).value_std
            values_init = normal_init(value_std, (MEMORY_ROWS, MEMORY_DIM))
        else:
            values_init = value_table_init(cfg, d_v)

        def linear(name: str, shape: tuple[int, ...], logical: tuple[str | None, ...]):
            fan_in = shape[-2]
            return self.param(name, normal_init(cfg.linear_std(fan_in, d_model), logical),
                              shape).astype(x.dtype)

        if shared_values is not None:
            table = shared_values
        else:
            table = self.param("values", values_init, (cfg.physical_rows, d_v))
        table = table.astype(x.dtype)

        if cfg.variant == "peer":
            d_prev = cfg.pre_value_dim or d_model
            ultramemv2 = cfg.init == "ultramemv2"
            down_init = values_init if ultramemv2 else value_table_init(cfg, d_prev)
            down = self.param("expert_down", down_init, (cfg.num_rows, d_prev))
            if cfg.pre_value_dim:
                flat_x = flat_x @ linear("pre_value_proj", (d_model, d_prev),
                                         (axes.EMBED, MEMORY_DIM))
            # [BT, H*k] fp32: each picked expert's down vector . x', by the bag kernels
            activation = expert_activations(down.astype(x.dtype), flat_i, flat_x, impl=cfg.impl)
            if cfg.peer_activation == "gelu":
                activation = jax.nn.gelu(activation)
            memory = read_values(table, flat_i, flat_w[..., 0] * activation, impl=cfg.impl)
            memory = memory.astype(x.dtype)
            if d_v != d_model:
                memory = memory @ linear("out", (d_v, d_model), (MEMORY_DIM, axes.EMBED))
            return self._tag(memory.reshape(batch, time, d_model)), aux

        d_read = read_width(cfg, d_model)
        if cfg.value_expansion == 1 and cfg.tucker_cores == 1:
            memory = read_values(table, flat_i, flat_w[..., 0], impl=cfg.impl)
        else:
            projections = None
            rows, which = flat_i, jnp.zeros_like(flat_i)
            if cfg.value_expansion > 1:
                # UltraMem's W_p [D_v, D] per virtual block (UltraMemV2 Eq. 9): straight to
                # the model width, no further output projection
                projections = linear("value_projections", (cfg.value_expansion, d_v, d_model),
                                     (MEMORY_EXPANSION, MEMORY_DIM, axes.EMBED))
                rows, which = expanded_index(flat_i, cfg.num_rows, cfg.value_expansion)
            memory = read_expanded_values(table, projections, rows, which, flat_w)
        memory = memory.astype(x.dtype)
        gated = cfg.gated or cfg.variant == "memory_plus"
        read_axis = MEMORY_DIM if d_read == d_v else axes.EMBED
        if gated:
            w_gate = linear("gate", (d_model, d_read), (axes.EMBED, read_axis))
            memory = jax.nn.silu(flat_x @ w_gate) * memory
        if gated or d_read != d_model:
            memory = memory @ linear("out", (d_read, d_model), (read_axis, axes.EMBED))
        return self._tag(memory.reshape(batch, time, d_model)), aux

    @staticmethod
    def _tag(out: jax.Array) -> jax.Array:
        return checkpoint_name(out, "memory_out")


def memory_param_count(cfg: MemoryConfig, d_model: int, *, include_values: bool = True) -> int:
    """Parameters of one memory layer (without the shared table when `include_values` is off)."""
    d_v = value_width(cfg, d_model)
    rank = max(cfg.tucker_rank, 1)
    key_heads = 1 if cfg.variant == "peer" else cfg.num_heads  # PEER's heads share sub-keys
    count = d_model * cfg.num_heads * rank * cfg.key_dim + key_heads * cfg.subkeys * cfg.key_dim
    if cfg.tucker_rank:
        count += cfg.num_heads * cfg.tucker_cores * rank * rank
    if cfg.tucker_rank or cfg.qk_norm:
        count += cfg.key_dim  # query and key gains, key_dim / 2 each
    if include_values:
        count += cfg.physical_rows * d_v
    if cfg.variant == "peer":
        d_prev = cfg.pre_value_dim or d_model
        count += cfg.num_rows * d_prev
        if cfg.pre_value_dim:
            count += d_model * d_prev
        return count + (d_v * d_model if d_v != d_model else 0)
    d_read = read_width(cfg, d_model)
    if cfg.value_expansion > 1:
        count += cfg.value_expansion * d_v * d_model
    gated = cfg.gated or cfg.variant == "memory_plus"
    if gated:
        count += d_model * d_read
    if gated or d_read != d_model:
        count += d_read * d_model
    return count


def memory_flops_per_token(cfg: MemoryConfig, d_model: int) -> float:
    """Training FLOPs per token of one memory layer (3x the forward multiply-adds x 2)."""
    d_v = value_width(cfg, d_model)
    rank = max(cfg.tucker_rank, 1)
    reads = cfg.num_heads * cfg.topk
    forward = d_model * cfg.num_heads * rank * cfg.key_dim  # query
    forward += cfg.num_heads * cfg.subkeys * cfg.key_dim * rank  # sub-key scores
    if cfg.tucker_rank:  # exact scores of the k*k candidates under each core
        forward += cfg.num_heads * cfg.tucker_cores * cfg.topk**2 * rank * rank
    if cfg.variant == "peer":
        d_prev = cfg.pre_value_dim or d_model
        forward += reads * (d_prev + d_v)
        forward += d_model * d_prev if cfg.pre_value_dim else 0
        forward += d_v * d_model if d_v != d_model else 0
    else:
        d_read = read_width(cfg, d_model)
        forward += reads * d_v  # the weighted row sums (one pass, whatever E and C)
        if cfg.value_expansion > 1:  # each token's E grouped sums through W_p
            forward += cfg.value_expansion * d_v * d_model
        gated = cfg.gated or cfg.variant == "memory_plus"
        forward += d_model * d_read * (int(gated) + int(gated or d_read != d_model))
    return 6.0 * forward
