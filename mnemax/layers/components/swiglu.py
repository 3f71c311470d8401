"""The dense SwiGLU FFN (`mnemax.layers.mlp`) as a block component: present in a block while
its width, after the other FFNs' `dense_ffn_scale`, is above 0."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mnemax.layers import checkpoint_names as names
from mnemax.layers.components.base import BlockContext, Component, register
from mnemax.layers.mlp import SwiGLU


@dataclasses.dataclass(frozen=True)
class SwiGLUFFN(Component):
    """out = (silu(x W_gate) * x W_up) W_down at the block's dense FFN width."""

    kind: ClassVar[str] = "ffn"
    name: ClassVar[str] = "swiglu"
    module_name: ClassVar[str] = "mlp"
    remat_names: ClassVar[tuple[str, ...]] = (names.MLP_GATE, names.MLP_UP, names.MLP_HIDDEN)

    init_std: float

    @classmethod
    def for_block(cls, model: Any, layer: int) -> SwiGLUFFN:
        return cls(init_std=model.init_std)

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array | None, dict[str, jax.Array]]:
        if not ctx.ffn_hidden_dim:  # another FFN replaces it in this block
            return None, {}
        module = SwiGLU(ctx.ffn_hidden_dim, self.init_std, ctx.out_init_std,
                        name=self.module_name)
        return module(x), {}

    def param_count(self, ctx: BlockContext) -> int:
        return 3 * ctx.model.d_model * ctx.ffn_hidden_dim

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        return 6.0 * self.param_count(ctx)


register(SwiGLUFFN)
