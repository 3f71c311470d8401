"""The Gated DeltaNet mixer (`gdn`, `mnemax.layers.gated_delta`) as a block component."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mnemax.layers import checkpoint_names as names
from mnemax.layers.components.base import BlockContext, Component, register
from mnemax.layers.gated_delta import (
    CONV,
    GatedDeltaCache,
    GatedDeltaConfig,
    GatedDeltaNet,
    init_cache,
)


@dataclasses.dataclass(frozen=True)
class GatedDeltaMixer(Component):
    """Gated DeltaNet with the model's `gated_delta` shape (default: the attention heads)."""

    kind: ClassVar[str] = "mixer"
    name: ClassVar[str] = "gdn"
    module_name: ClassVar[str] = "gdn"
    remat_names: ClassVar[tuple[str, ...]] = (names.GDN_QKV, names.GDN_OUT)
    # The short convolution's kernel width (4): never sharded.
    axis_sharding: ClassVar[dict[str, str | None]] = {CONV: None}

    config: GatedDeltaConfig

    @classmethod
    def for_block(cls, model: Any, layer: int) -> GatedDeltaMixer:
        return cls(model.gdn)

    def validate(self, model: Any) -> None:
        self.config.validate()

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        return GatedDeltaNet(self.config, name=self.module_name)(x)[0], {}

    def param_count(self, ctx: BlockContext) -> int:
        return self.config.param_count(ctx.model.d_model)

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        return self.config.flops_per_token(ctx.model.d_model)

    def init_cache(self, ctx: BlockContext, batch: int, max_len: int,
                   dtype: Any = None) -> GatedDeltaCache:
        """The conv history and the recurrent state: fixed size, whatever `max_len`."""
        return init_cache(self.config, batch, dtype or jnp.float32)

    def decode(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
               shared: dict[str, jax.Array],
               cache: GatedDeltaCache) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        out, cache = GatedDeltaNet(self.config, name=self.module_name)(x, cache)
        return out, {}, cache


register(GatedDeltaMixer)
