"""Memory layers (product keys, Memory+, UltraMem(V2), PEER; `mnemax.layers.memory`) as an FFN
component: in the blocks `model.memory.layers`, in place of the dense FFN (`mode=replace`) or
beside a narrower one (`mode=parallel`, width x `ffn_ratio`)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mnemax.layers import checkpoint_names as names
from mnemax.layers.components.base import BlockContext, Component, SharedParam, register
from mnemax.layers.memory import (
    MemoryConfig,
    MemoryLayer,
    memory_flops_per_token,
    memory_param_count,
)
from mnemax.layers.memory.layer import TUCKER_LOSS, value_table_init, value_width
from mnemax.layers.memory.retrieval import MEMORY_KEYS, MEMORY_RANK
from mnemax.layers.memory.values import MEMORY_ROWS

SHARED_VALUES = "memory_values"


def _shares_table(config: MemoryConfig) -> bool:
    """Memory+'s one table for all memory layers (PEER's experts are never shared)."""
    return config.shared and config.variant != "peer"


@dataclasses.dataclass(frozen=True)
class MemoryFFN(Component):
    """A memory layer in one block; Memory+'s shared value table is a shared parameter."""

    kind: ClassVar[str] = "ffn"
    name: ClassVar[str] = "memory"
    module_name: ClassVar[str] = "memory"
    remat_names: ClassVar[tuple[str, ...]] = (names.MEMORY_OUT,)
    # TUCKER_LOSS (`loss/memory_tucker_core`) only with `tucker_penalty > 0`; the trainer adds
    # every `loss/*` entry to the objective.
    aux_keys: ClassVar[tuple[str, ...]] = ("memory/usage", "memory/weight_entropy", TUCKER_LOSS)
    # Value tables are sparse (own lr, no decay); sub-keys and Tucker cores are not decayed:
    # the reasons are in mnemax/layers/roles.py.
    axis_roles: ClassVar[dict[str, str]] = {MEMORY_ROWS: "table", MEMORY_KEYS: "keys",
                                            MEMORY_RANK: "core"}
    # Memory blocks run in a Python loop: each keeps its own `layer_i/memory` parameters (and
    # Memory+'s table is passed to every block), the tree existing checkpoints have.
    scannable: ClassVar[bool] = False

    config: MemoryConfig

    @classmethod
    def for_block(cls, model: Any, layer: int) -> MemoryFFN | None:
        if model.memory is None or layer not in model.memory.layers:
            return None
        return cls(model.memory)

    @classmethod
    def check_model(cls, model: Any) -> None:
        if model.memory is not None:
            model.memory.validate(model.d_model, model.num_layers)

    def dense_ffn_scale(self) -> float:
        return 0.0 if self.config.mode == "replace" else self.config.ffn_ratio

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        model = ctx.model
        module = MemoryLayer(self.config, num_layers=model.num_layers,
                             ffn_hidden_dim=ctx.ffn_hidden_dim or model.hidden_dim,
                             name=self.module_name)
        return module(x, shared.get(SHARED_VALUES))

    def param_count(self, ctx: BlockContext) -> int:
        return memory_param_count(self.config, ctx.model.d_model,
                                  include_values=not _shares_table(self.config))

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        return memory_flops_per_token(self.config, ctx.model.d_model)

    @classmethod
    def shared_params(cls, model: Any) -> tuple[SharedParam, ...]:
        if model.memory is None or not model.memory.layers or not _shares_table(model.memory):
            return ()
        width = value_width(model.memory, model.d_model)
        return (SharedParam(SHARED_VALUES, value_table_init(model.memory, width),
                            (model.memory.physical_rows, width)),)


register(MemoryFFN)
