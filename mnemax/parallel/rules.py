"""Logical-axis rules: logical names used by layers -> mesh axes chosen by the strategy."""

from __future__ import annotations

from mnemax.layers import axes
from mnemax.parallel.strategy import Strategy

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def logical_axis_rules(strategy: Strategy) -> LogicalRules:
    """Batch over (data, fsdp) always; at ZeRO stage 3 the `embed` dim of every weight over fsdp."""
    param_embed = "fsdp" if strategy.zero_stage == 3 else None
    data_axes = ("data", "fsdp")
    memory_rows = data_axes if strategy.memory_sharding == "rows" else None
    memory_dim = data_axes if strategy.memory_sharding == "dim" else None
    return (
        # Memory value tables (mnemax.layers.memory) are sharded over all data-parallel devices
        # whatever the ZeRO stage: they are the bulk of a memory model's parameters.
        ("memory_rows", memory_rows),
        ("memory_dim", memory_dim),
        ("memory_heads", None),
        ("memory_keys", None),
        ("memory_key_dim", None),
        ("memory_rank", None),
        ("memory_expansion", None),
        (axes.ACT_BATCH, ("data", "fsdp")),
        (axes.ACT_LENGTH, None),
        (axes.ACT_EMBED, None),
        (axes.ACT_HEADS, None),
        (axes.ACT_KV_HEADS, None),
        (axes.ACT_MLP, None),
        (axes.ACT_VOCAB, None),
        (axes.EMBED, param_embed),
        (axes.VOCAB, None),
        (axes.HEADS, None),
        (axes.KV_HEADS, None),
        (axes.HEAD_DIM, None),
        (axes.MLP, None),
        (axes.LAYERS, None),
        (axes.NORM, param_embed),
    )
