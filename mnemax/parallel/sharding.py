"""Sharding trees for the train state, derived from the logical axis names of parameters."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnemax.errors import ConfigError
from mnemax.parallel.mesh import batch_axes, data_parallel_size
from mnemax.parallel.rules import LogicalRules


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """`NamedSharding` for every leaf of a tree whose leaves may be `nn.LogicallyPartitioned`.

    Unannotated leaves (optimizer step counters, scalars) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")  # memory kinds outside the device
TENSOR_HINT = (". Tensor parallelism splits attention heads, kv heads, the MLP hidden size "
               "and the vocabulary over the tensor axis: its size must divide each of them")


def check_divisible(abstract_tree: Any, shardings: Any, what: str = "state") -> None:
    """Raises ConfigError naming the first leaf whose dimension the mesh axes do not divide."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(leaves, sharding_leaves, strict=True):
        spec = sharding.spec
        for dim, mesh_axes in enumerate(spec):
            if mesh_axes is None:
                continue
            names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            ways = math.prod(sharding.mesh.shape[a] for a in names)
            if leaf.shape[dim] % ways:
                hint = TENSOR_HINT if "tensor" in names else ""
                raise ConfigError(
                    f"{what} {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}: dimension "
                    f"{dim} of size {leaf.shape[dim]} is not divisible by {ways} (mesh axes "
                    f"{'x'.join(names)}). Change the model size so that {leaf.shape[dim]} is a "
                    f"multiple of {ways}, or change strategy.mesh / strategy.zero_stage{hint}"
                )


def check_batch(global_batch: int, grad_accum: int, mesh: Mesh) -> None:
    """The global batch must split into `grad_accum` micro-batches that the data axes divide."""
    if global_batch % grad_accum:
        raise ConfigError(
            f"data.global_batch={global_batch} is not divisible by run.grad_accum={grad_accum}; "
            "pick a global batch that is a multiple of the number of micro-batches"
        )
    micro = global_batch // grad_accum
    ways = data_parallel_size(mesh)
    if micro % ways:
        raise ConfigError(
            f"micro-batch of {micro} sequences (data.global_batch={global_batch} / run.grad_accum="
            f"{grad_accum}) is not divisible by the {ways} data-parallel devices (mesh "
            f"{' x '.join(f'{a}={mesh.shape[a]}' for a in batch_axes(mesh))}); use a batch "
            f"that is a multiple of {ways * grad_accum} or a different strategy.mesh"
        )


def check_zero_stage(zero_stage: int, mesh: Mesh) -> None:
    """ZeRO 3 splits parameters over the fsdp axis: on a mesh whose data-parallel devices are
    all on the data axis it would shard nothing, so it is refused rather than run as stage 0."""
    if zero_stage == 3 and mesh.shape["fsdp"] == 1 and mesh.shape["data"] > 1:
        data = mesh.shape["data"]
        raise ConfigError(
            f"strategy.zero_stage=3 shards parameters over the fsdp mesh axis, but the mesh has "
            f"fsdp=1 (data={data}), so nothing would be sharded; use strategy.mesh=fsdp:-1 (or "
            f"data:D,fsdp:F with D x F = {data}), or strategy.zero_stage=1|2 to shard only the "
            "optimizer state (and gradients) over the data axis"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches `[batch, ...]` are split over the `batch_axes` (data, fsdp, under expert
    parallelism expert)."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def bytes_per_device(abstract_tree: Any, shardings: Any) -> tuple[int, int]:
    """`(device_bytes, host_bytes)` one device holds of `abstract_tree` laid out by `shardings`
    (the largest shard of each leaf), split by each sharding's `memory_kind`: leaves placed in
    `HOST_MEMORY_KINDS` count as host bytes. The one count of state per device: the trainer's
    `TrainProgram.memory_per_device`, `mnemax show` and the planner all use it."""
    device = host = 0
    sharding_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), sharding_leaves, strict=True):
        size = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if sharding.memory_kind in HOST_MEMORY_KINDS:
            host += size
        else:
            device += size
    return device, host
