"""Logical-axis rules: logical names used by layers -> mesh axes chosen by the strategy."""

from __future__ import annotations

from mnemax.layers import axes
from mnemax.parallel.strategy import Strategy

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def logical_axis_rules(strategy: Strategy) -> LogicalRules:
    """Batch over (data, fsdp) always; at ZeRO stage 3 the `embed` dim of every weight over fsdp."""
    param_embed = "fsdp" if strategy.zero_stage == 3 else None
    return (
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
