"""Device mesh construction."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from mnemax.parallel.strategy import MESH_AXES, Strategy, batch_axes_of, resolve_mesh_shape


def make_mesh(strategy: Strategy, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all five named axes (unused ones have size 1), with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(strategy.mesh, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES), MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices,
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes the batch is split over (`strategy.batch_axes_of`): data, fsdp and, under
    expert parallelism, expert."""
    return batch_axes_of(mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (the `batch_axes` together)."""
    size = 1
    for axis in batch_axes(mesh):
        size *= mesh.shape[axis]
    return size
