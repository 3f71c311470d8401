"""The mixture-of-experts FFN (`mnemax.layers.moe`) as a block component: in the blocks
`model.moe.layers`, in place of the dense FFN (`mode=replace`) or beside a narrower one
(`mode=parallel`, width x `ffn_ratio`).

`mnemax.layers.moe.layer` is imported as a module, not by its names: it imports this package
(for MODEL_STATE), so it may still be loading when this file is imported."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mnemax.layers import checkpoint_names as names
from mnemax.layers.components.base import BlockContext, Component, register
from mnemax.layers.moe import layer as moe_layer
from mnemax.layers.moe.config import MoEConfig
from mnemax.layers.moe.router import balanced_bias


@dataclasses.dataclass(frozen=True)
class MoEFFN(Component):
    """Routed (and shared) SwiGLU experts in one block; expert weights are `matrix` parameters
    (decayed, the dense learning rate) by their two or more axes (mnemax.layers.roles)."""

    kind: ClassVar[str] = "ffn"
    name: ClassVar[str] = "moe"
    module_name: ClassVar[str] = "moe"
    remat_names: ClassVar[tuple[str, ...]] = (names.MOE_OUT,)
    aux_keys: ClassVar[tuple[str, ...]] = ("loss/moe_load_balance", "loss/moe_router_z",
                                           "moe/max_load", "moe/dropped_fraction")
    # No axis_sharding: `expert` is a shared logical axis (mnemax.layers.axes) that the parallel
    # rules map to the `expert` mesh axis.

    config: MoEConfig

    @classmethod
    def for_block(cls, model: Any, layer: int) -> MoEFFN | None:
        if model.moe is None or layer not in model.moe.layers:
            return None
        return cls(model.moe)

    @classmethod
    def check_model(cls, model: Any) -> None:
        if model.moe is not None:
            model.moe.validate(model.d_model, model.num_layers)

    def dense_ffn_scale(self) -> float:
        return 0.0 if self.config.mode == "replace" else self.config.ffn_ratio

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        module = moe_layer.MoELayer(self.config, ctx.model.init_std, ctx.out_init_std,
                                    name=self.module_name)
        return module(x)

    def param_count(self, ctx: BlockContext) -> int:
        return self.config.param_count(ctx.model.d_model)

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        return self.config.flops_per_token(ctx.model.d_model)

    def update_state(self, state: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        """DeepSeek-V3's bias step from the step's per-expert loads (all micro-batches)."""
        if moe_layer.BIAS not in state:
            return state
        bias = balanced_bias(state[moe_layer.BIAS], stats[moe_layer.LOAD],
                             self.config.bias_update_rate)
        return {**state, moe_layer.BIAS: bias}


register(MoEFFN)
