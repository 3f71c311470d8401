"""Device mesh construction."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from mnemax.parallel.strategy import MESH_AXES, Strategy, resolve_mesh_shape


def make_mesh(strategy: Strategy, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all five named axes (unused ones have size 1), with Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(strategy.mesh, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES), MESH_AXES,
        axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices,
    )


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (the data and fsdp axes together)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]
