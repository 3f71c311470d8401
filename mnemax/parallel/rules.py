"""Logical-axis rules: logical names used by layers -> mesh axes chosen by the strategy."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from mnemax.errors import ConfigError
from mnemax.layers import axes, components
from mnemax.parallel.strategy import Strategy

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def logical_axis_rules(strategy: Strategy) -> LogicalRules:
    """Batch over (data, fsdp) always, and over expert too under expert parallelism (MoE
    experts over `expert`); at ZeRO stage 3 the `embed` dim of every weight over fsdp.

    Tensor parallelism (Shoeybi et al., "Megatron-LM", 2019) comes from the `tensor` axis:
    attention heads, kv heads and the MLP hidden dimension are split over it (column-parallel
    q/k/v and gate/up, row-parallel o and down, so each block needs one reduction forward and
    one backward), and so is the vocabulary (vocab-parallel embedding and logits). The rules map
    these names to `tensor` whatever its size; at size 1 that is a no-op. With
    `sequence_parallel`, the residual stream between blocks is split along the sequence over
    `tensor` too (Korthikanti et al. 2022), turning the reductions into reduce-scatters and
    all-gathers and the norms into per-shard work.
    """
    param_embed = "fsdp" if strategy.zero_stage == 3 else None
    residual_length = "tensor" if strategy.sequence_parallel else None
    data_axes = ("data", "fsdp")
    memory_rows = data_axes if strategy.memory_sharding == "rows" else None
    memory_dim = data_axes if strategy.memory_sharding == "dim" else None
    rules = (
        # Memory value tables (mnemax.layers.memory) are sharded over all data-parallel devices
        # whatever the ZeRO stage: they are the bulk of a memory model's parameters.
        ("memory_rows", memory_rows),
        ("memory_dim", memory_dim),
        ("memory_heads", None),
        ("memory_keys", None),
        ("memory_key_dim", None),
        ("memory_rank", None),
        ("memory_expansion", None),
        (axes.ACT_BATCH, strategy.batch_axes),
        # MoE experts (expert parallelism); a size-1 expert axis splits nothing.
        (axes.EXPERT, "expert"),
        (axes.ACT_LENGTH, None),
        (axes.ACT_RESIDUAL_LENGTH, residual_length),
        (axes.ACT_EMBED, None),
        (axes.ACT_HEADS, "tensor"),
        (axes.ACT_KV_HEADS, "tensor"),
        (axes.ACT_MLP, "tensor"),
        (axes.ACT_VOCAB, "tensor"),
        (axes.EMBED, param_embed),
        (axes.VOCAB, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.KV_HEADS, "tensor"),
        (axes.HEAD_DIM, None),
        (axes.MLP, "tensor"),
        (axes.LAYERS, None),
        (axes.NORM, param_embed),
    )
    # Axes block components introduce, sharded like the existing axis each names.
    known = dict(rules)
    extra = tuple((axis, None if like is None else known[like])
                  for axis, like in components.axis_sharding().items()
                  if (like is None or like in known) and axis not in known)
    return rules + extra


def check_rules_cover(boxed_params: Any, rules: LogicalRules) -> None:
    """Raises ConfigError naming a parameter whose logical axis no rule covers (flax would
    replicate it silently)."""
    covered = {name for name, _ in rules}
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        for name in getattr(leaf, "names", ()) or ():
            if name is not None and name not in covered:
                raise ConfigError(
                    f"parameter {jax.tree_util.keystr(path)} has logical axis {name!r}, which no "
                    "sharding rule covers; the block component that creates it must declare "
                    f"how it is sharded in its `axis_sharding` (e.g. {{{name!r}: 'mlp'}}: "
                    "sharded like the MLP hidden axis)")
