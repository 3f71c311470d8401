"""The block-component protocol: what a mixer or an FFN tells the model that composes it.

A decoder block is `x + mixer(norm(x))` then `x + sum of FFNs(norm(x))`. Each mixer (attention,
sliding-window attention, Gated DeltaNet, ...) and each FFN (SwiGLU, a memory layer, ...) is a
frozen config registered by name, in the manner of torchtitan's `Configurable.build()`:

- `for_block(model, layer)`: the component's config for block `layer`, read from the whole model
  config (None when the component has no part in that block; FFNs only);
- `apply(ctx, x, ...)`: called inside the block's `nn.compact` body, builds the flax module under
  its `module_name` (the parameter path: `attn`, `gdn`, `mlp`, `memory`) and returns
  `(output, aux)` (an FFN may return `(None, {})` to sit a block out);
- `param_count(ctx)` and `flops_per_token(ctx, seq_len)` (training: forward + backward) of the
  component in one block; parameters it shares across blocks are declared once by
  `shared_params(model)` and counted once by the model;
- `update_state(state, stats)`: its non-parameter state (MODEL_STATE variables) after a step,
  from the statistics it recorded (STATE_STATS), once per step whatever the micro-batching;
- mixers only, for decoding: `init_cache(ctx, batch, max_len, dtype)` (None: no cache; the
  model then recomputes its whole forward per token) and `decode(ctx, x, positions, shared,
  cache)`, the same output as `apply` for tokens that continue the cached ones;
- class-level declarations: `remat_names` (the `checkpoint_name` tags it sets), `aux_keys`
  (the names it puts in `aux`), `axis_roles` (the optimizer role of parameters with one of its
  own logical axes, see `mnemax.layers.roles`), `axis_sharding` (each new logical axis it
  introduces -> the existing logical axis it is sharded like, or None for never sharded: the
  parallel rules extend to it, and an axis no rule covers is an error, never silently
  replicated) and `scannable` (whether
  identical blocks holding it may be stacked by `nn.scan`); FFNs also give
  `dense_ffn_scale()`, the factor on the block's dense FFN width while they are present (0
  replaces it).

Adding a component is a new module with a config class and one `register_mixer` /
`register_ffn` line; `mnemax show`, `plan`, the optimizer's groups and the remat names read it
through this protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax

ComponentKind = Literal["mixer", "ffn"]
# Flax collections of non-parameter model state (MoE's balancing bias, running statistics):
# components keep it in MODEL_STATE variables and put the statistics its update needs in
# STATE_STATS (`self.put_variable(STATE_STATS, name, value)`); the trainer averages the
# statistics over a step's micro-batches and calls `update_state` once per step. It is never a
# parameter: no gradient, no Adam, no weight decay.
MODEL_STATE = "model_state"
STATE_STATS = "state_stats"


@dataclasses.dataclass(frozen=True)
class BlockContext:
    """What a component sees of the model it is in, for one block."""

    model: Any  # the whole model config (mnemax.layers.transformer.TransformerConfig)
    layer: int  # block index, 0-based
    ffn_hidden_dim: int  # the dense FFN width of this block after every FFN's scale (0: none)
    out_init_std: float  # std of output projections: init_std / sqrt(2 * num_layers)


@dataclasses.dataclass(frozen=True)
class SharedParam:
    """A parameter one component shares across blocks, created once by the model."""

    name: str  # its name at the top of the parameter tree
    init: Any  # initializer (with logical partitioning)
    shape: tuple[int, ...]


class Component:
    """Defaults for the protocol; a component subclasses this as a frozen dataclass."""

    kind: ClassVar[ComponentKind]
    name: ClassVar[str]  # registry name
    module_name: ClassVar[str]  # its parameters live under block/<module_name>/
    remat_names: ClassVar[tuple[str, ...]] = ()
    aux_keys: ClassVar[tuple[str, ...]] = ()
    axis_roles: ClassVar[dict[str, str]] = {}
    axis_sharding: ClassVar[dict[str, str | None]] = {}
    scannable: ClassVar[bool] = True

    @classmethod
    def for_block(cls, model: Any, layer: int) -> Component | None:
        raise NotImplementedError

    @classmethod
    def check_model(cls, model: Any) -> None:
        """Raises a ConfigError for this component's settings in the model config, whether or
        not a block holds it (a memory configured for no existing block is an error)."""

    def validate(self, model: Any) -> None:
        """Raises ValueError naming the model field whose value cannot build this component."""

    def dense_ffn_scale(self) -> float:
        """FFNs: factor on the block's dense FFN width while this one is present (0: none)."""
        return 1.0

    def apply(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
              shared: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def param_count(self, ctx: BlockContext) -> int:
        raise NotImplementedError

    def flops_per_token(self, ctx: BlockContext, seq_len: int) -> float:
        raise NotImplementedError

    @classmethod
    def shared_params(cls, model: Any) -> tuple[SharedParam, ...]:
        return ()

    def update_state(self, state: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
        """This component's MODEL_STATE variables after one step, from their values before it
        and the step's STATE_STATS (averaged over its micro-batches). Leaves of stacked
        (scanned) blocks are updated one block at a time (`jax.vmap`)."""
        return state

    def init_cache(self, ctx: BlockContext, batch: int, max_len: int,
                   dtype: Any = None) -> Any:
        """Mixers: the decoding cache of this component for `batch` sequences of up to
        `max_len` tokens, activations in `dtype` (None: float32). None: it has no cache, and a
        model holding it decodes by recomputing the whole forward (`mnemax.layers.decoding`)."""
        return None

    def decode(self, ctx: BlockContext, x: jax.Array, positions: jax.Array,
               shared: dict[str, jax.Array],
               cache: Any) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        """Mixers with a cache: `x` `[batch, t, embed]` at absolute `positions` `[t]` (they
        continue the tokens `cache` holds) -> (output `[batch, t, embed]`, aux, new cache).
        Called inside the block's `nn.compact` body with the parameters `apply` creates."""
        raise NotImplementedError(f"{type(self).__name__} has no decoding cache")


MIXERS: dict[str, type[Component]] = {}
FFNS: dict[str, type[Component]] = {}


def _registry(kind: ComponentKind) -> dict[str, type[Component]]:
    return MIXERS if kind == "mixer" else FFNS


def register(cls: type[Component], *names: str) -> type[Component]:
    """Registers a component class under `names` (default: `cls.name`)."""
    registry = _registry(cls.kind)
    for name in names or (cls.name,):
        if name in registry and registry[name] is not cls:
            raise ValueError(f"a {cls.kind} named {name!r} is already registered "
                             f"({registry[name].__qualname__})")
        registry[name] = cls
    return cls


def unregister(cls: type[Component]) -> None:
    registry = _registry(cls.kind)
    for name in [n for n, c in registry.items() if c is cls]:
        del registry[name]


@contextlib.contextmanager
def registered(cls: type[Component], *names: str) -> Iterator[type[Component]]:
    """Registers `cls` for the duration of a `with` block (tests, experiments)."""
    register(cls, *names)
    try:
        yield cls
    finally:
        unregister(cls)


def all_components() -> list[type[Component]]:
    """Every registered component class, mixers first, each once."""
    seen: list[type[Component]] = []
    for cls in [*MIXERS.values(), *FFNS.values()]:
        if cls not in seen:
            seen.append(cls)
    return seen


def remat_names() -> tuple[str, ...]:
    """Every `checkpoint_name` a registered component tags, in registration order."""
    names: list[str] = []
    for cls in all_components():
        names += [n for n in cls.remat_names if n not in names]
    return tuple(names)


def axis_roles() -> dict[str, str]:
    """Logical axis -> optimizer role, from every registered component."""
    roles: dict[str, str] = {}
    for cls in all_components():
        roles.update(cls.axis_roles)
    return roles


def axis_sharding() -> dict[str, str | None]:
    """New logical axis -> the logical axis it is sharded like (None: never sharded), from
    every component."""
    aliases: dict[str, str | None] = {}
    for cls in all_components():
        aliases.update(cls.axis_sharding)
    return aliases


def make_param(module: nn.Module, shared: SharedParam) -> jax.Array:
    """Creates `shared` as a parameter of `module` (the model, at the top of the tree)."""
    return module.param(shared.name, shared.init, shared.shape)
