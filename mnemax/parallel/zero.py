"""The ZeRO layout (Rajbhandari et al., "ZeRO", 2020): what each stage splits, and how.

This is the one place that decides it; the trainer, `mnemax show` and `mnemax plan` all ask
`zero_layout`. With D = the `data` axis and F = the `fsdp` axis (D x F data-parallel devices;
under expert parallelism the `expert` axis is data parallel too and joins D):

| stage | parameters             | gradients   | optimizer state |
|-------|------------------------|-------------|-----------------|
| 0     | as the rules say       | as params   | as params       |
| 1     | as the rules say       | as params   | over D x F      |
| 2     | as the rules say       | over D x F  | over D x F      |
| 3     | over F (the rules map  | over D x F  | over D x F      |
|       | `embed` to fsdp)       |             |                 |

"As the rules say" is replicated over D x F except what `parallel/rules.py` always shards:
the `tensor` dims and the memory value tables (already over D x F at every stage).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from mnemax.errors import ConfigError
from mnemax.layers.axes import mesh_axis_names
from mnemax.parallel.strategy import batch_axes_of


@dataclasses.dataclass(frozen=True)
class ZeroLayout:
    """Three trees of `NamedSharding`, each shaped like the parameters.

    `opt_state_like_params` is the layout of a parameter-shaped optimizer leaf (an Adam moment);
    `trainer.setup.follow_param_shardings` maps it onto the optimizer state's own tree.
    """

    params: Any
    grads: Any
    opt_state_like_params: Any


def zero_layout(stage: int, abstract_params: Any, param_shardings: Any) -> ZeroLayout:
    """The shardings of parameters, gradients and optimizer state at ZeRO `stage` (0-3).

    `abstract_params`: the parameters' tree of `ShapeDtypeStruct`s; `param_shardings`: their
    `NamedSharding`s from the logical-axis rules (at stage 3 these already split `embed` over
    fsdp). Stages 1-3 split the optimizer state, and stages 2-3 the gradients, over every
    data-parallel device (`spread_over_data_parallel`), so that stage 3 never holds more per
    device than stage 2.
    """
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.zero_stage={stage} is unknown; choose 0, 1, 2 or 3")
    if stage == 0:
        return ZeroLayout(param_shardings, param_shardings, param_shardings)
    spread = spread_over_data_parallel(abstract_params, param_shardings)
    grads = spread if stage >= 2 else param_shardings
    return ZeroLayout(params=param_shardings, grads=grads, opt_state_like_params=spread)


def spread_over_data_parallel(abstract_tree: Any, shardings: Any) -> Any:
    """Shardings that split each leaf over all data-parallel axes (data x fsdp).

    A leaf keeps its sharding and gets the data-parallel axes it lacks added (`_spread`);
    leaves that no dimension lets split that way (scalars, odd sizes) keep their sharding.
    The memory kind (device or pinned_host) is kept.
    """
    return jax.tree.map(_spread, abstract_tree, shardings)


def _spread(leaf: Any, sharding: NamedSharding) -> NamedSharding:
    """`sharding` with the data-parallel axes it does not use yet added to one dimension.

    Where a dimension is already split over a data-parallel axis (stage 3: `embed` over
    fsdp), the missing axes go after it on that same dimension, ("fsdp",) -> ("fsdp", "data"):
    with fsdp major, device (data i, fsdp j) holds chunk j * D + i, which lies inside its
    parameter shard j, so the optimizer update slices its own parameter shard and only
    all-gathers over `data` afterwards (("data", "fsdp") would hand it a chunk of another
    device's parameter shard). Otherwise (or if that dimension does not divide) they go on the
    largest unsharded dimension they divide. A leaf nothing divides is left as it is.
    """
    mesh = sharding.mesh
    data_parallel = batch_axes_of(mesh.shape)
    spec = [mesh_axis_names(e) for e in sharding.spec] + [()] * (leaf.ndim - len(sharding.spec))
    used = {a for entry in spec for a in entry}
    missing = tuple(a for a in data_parallel if a not in used)
    ways = math.prod(mesh.shape[a] for a in missing)
    if ways == 1:
        return sharding
    dim = _dimension_for(leaf.shape, spec, missing, mesh.shape, data_parallel)
    if dim is None:
        return sharding
    spec[dim] = spec[dim] + missing
    entries = [None if not e else e[0] if len(e) == 1 else e for e in spec]
    return NamedSharding(mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind)


def _dimension_for(shape: tuple[int, ...], spec: list[tuple[str, ...]],
                   missing: tuple[str, ...], mesh_shape: Any,
                   data_parallel: tuple[str, ...]) -> int | None:
    """The dimension `missing` axes are added to (see `_spread`), or None if none divides."""

    def divides(dim: int) -> bool:
        ways = math.prod(mesh_shape[a] for a in spec[dim] + missing)
        return shape[dim] % ways == 0

    for dim, entry in enumerate(spec):
        if set(entry) & set(data_parallel) and divides(dim):
            return dim
    free = [d for d, entry in enumerate(spec) if not entry and divides(d)]
    return max(free, key=lambda d: shape[d]) if free else None
