"""The parallel strategy a recipe chooses: mesh shape, ZeRO stage, activation remat."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Literal, get_args

from mnemax.errors import ConfigError, check_choices

MESH_AXES = ("data", "fsdp", "tensor", "expert", "seq")
ZERO_STAGES = (0, 1, 2, 3)
# How memory value tables are split over data x fsdp: `dim` (each device holds a column slice of
# every row, as Memory+ does), `rows` or `replicated`.
MemorySharding = Literal["dim", "rows", "replicated"]
MEMORY_SHARDINGS = get_args(MemorySharding)
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
REMAT_NAMED = ("save_names", "offload_names")  # `kind:name,name,...` (checkpoint_name tags)
UNSUPPORTED_AXES = ("seq",)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a model is laid out over devices.

    `mnemax.parallel` turns it into a mesh, axis rules, the ZeRO layout and a remat policy.
    Outside it, a few read single fields without deciding any layout: `mnemax.trainer.setup`
    hands it (and its `zero_stage` and `remat`) to those `mnemax.parallel` functions and moves
    the optimizer state to host memory when `offload_optimizer` is set; `mnemax.trainer.loop` logs
    `zero_stage`; `mnemax.recipes.summary` (`mnemax show`) prints `zero_stage` and passes it
    and `offload_optimizer` to the ZeRO formula; `mnemax.launch.plan` keeps the `tensor` size
    of `mesh` and writes `zero_stage`, `remat` and `offload_optimizer` as its candidates'
    overrides. `mnemax.trainer.recipe.Recipe` holds it as its `strategy` section.
    """

    # "axis:size,..." (data|fsdp|tensor|expert|seq); -1 = remaining devices. `expert` splits the
    # MoE experts (expert parallelism) and, for every other layer, the batch like `data`.
    mesh: str = "data:-1"
    # ZeRO (Rajbhandari et al. 2020) over the data-parallel axes (data x fsdp): 0 replicates
    # params, grads and optimizer state; 1 shards optimizer state; 2 also gradients (reduce-
    # scattered); 3 (FSDP) also parameters, over the fsdp axis.
    zero_stage: int = 0
    # Activation rematerialisation: none | full | dots_saveable |
    # dots_with_no_batch_dims_saveable | save_names:NAME,... (keep only the tagged
    # intermediates) | offload_names:NAME,... (keep them in pinned host memory).
    remat: str = "none"
    memory_sharding: MemorySharding = "dim"  # memory value tables over data x fsdp
    # Megatron sequence parallelism (Korthikanti et al. 2022): between blocks, activations are
    # split along the sequence over the `tensor` axis instead of being replicated on it.
    sequence_parallel: bool = False
    # Keep the optimizer state in pinned host memory; it is moved to the device for the update.
    offload_optimizer: bool = False

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """Mesh axes the batch (and ZeRO's data-parallel sharding) is split over."""
        return batch_axes_of(parse_mesh(self.mesh))

    def __post_init__(self) -> None:
        parse_mesh(self.mesh)
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(
                f"strategy.zero_stage={self.zero_stage} is not available: supported stages are "
                f"{', '.join(map(str, ZERO_STAGES))} (0 replicated, 1 sharded optimizer state, "
                "2 + sharded gradients, 3 + sharded parameters)"
            )
        check_choices(self, "strategy")
        parse_remat(self.remat)


def batch_axes_of(sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes the batch is split over, given the mesh's axis sizes: data and fsdp, and
    expert when it has more than one device (expert parallelism: as in MaxText, the expert axis
    also splits the batch of every layer that is not an expert, so it counts as data parallel
    for the batch checks and ZeRO)."""
    return ("data", "fsdp") + (("expert",) if sizes.get("expert", 1) != 1 else ())


def parse_remat(spec: str) -> tuple[str, tuple[str, ...]]:
    """`"full"` -> `("full", ())`; `"save_names:attn_out,mlp_hidden"` -> `("save_names",
    ("attn_out", "mlp_hidden"))`. Which names exist is checked by `mnemax.parallel.remat`."""
    kind, sep, rest = spec.partition(":")
    if not sep and kind in REMAT_POLICIES:
        return kind, ()
    names = tuple(n.strip() for n in rest.split(",") if n.strip())
    if sep and kind in REMAT_NAMED and names:
        return kind, names
    raise ConfigError(
        f"strategy.remat={spec!r} is not a known policy; choose one of "
        f"{', '.join(REMAT_POLICIES)}, or save_names:NAME,... / offload_names:NAME,... "
        "(example: offload_names:attn_out,mlp_hidden)"
    )


def parse_mesh(spec: str) -> dict[str, int]:
    """`"data:2,fsdp:4"` -> `{"data": 2, "fsdp": 4}` (sizes may be -1 once)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition(":")
        if not sep or name not in MESH_AXES:
            raise ConfigError(
                f"strategy.mesh={spec!r}: {part!r} is not 'axis:size' with axis in "
                f"{'|'.join(MESH_AXES)} (example: data:2,fsdp:4; -1 = all remaining devices)"
            )
        try:
            value = int(size)
        except ValueError:
            raise ConfigError(f"strategy.mesh={spec!r}: size {size!r} of axis {name!r} is not an "
                              "integer") from None
        if value == 0 or value < -1:
            raise ConfigError(f"strategy.mesh={spec!r}: axis {name!r} has size {value}; sizes "
                              "are positive, or -1 for all remaining devices")
        if name in sizes:
            raise ConfigError(f"strategy.mesh={spec!r} names axis {name!r} twice")
        sizes[name] = value
    if list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"strategy.mesh={spec!r}: at most one axis may have size -1")
    for name in UNSUPPORTED_AXES:
        if sizes.get(name, 1) != 1:
            raise ConfigError(
                f"strategy.mesh={spec!r}: the {name!r} axis is not supported yet (context "
                "parallelism arrives with a later issue); use data, fsdp, tensor and expert "
                "(sequence parallelism: strategy.sequence_parallel=true over the tensor axis)"
            )
    return sizes


def resolve_mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
    """Sizes of all `MESH_AXES` for `num_devices` devices; -1 absorbs what is left."""
    sizes = parse_mesh(spec)
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(
                f"strategy.mesh={spec!r}: the fixed axes use {known} devices, which does not "
                f"divide the {num_devices} devices present; pick sizes whose product divides "
                f"{num_devices}"
            )
        sizes = {k: (num_devices // known if v == -1 else v) for k, v in sizes.items()}
    elif known != num_devices:
        raise ConfigError(
            f"strategy.mesh={spec!r} needs {known} devices but {num_devices} are present; "
            "change the sizes or use -1 on one axis to take the remaining devices"
        )
    return {name: sizes.get(name, 1) for name in MESH_AXES}
