"""Reading value rows: a weighted bag of rows of a (possibly sharded) value table.

The table has logical axes `("memory_rows", "memory_dim")`. When the strategy maps
`memory_dim` to mesh axes (Memory+'s layout), every device holds a column slice of every row:
the slot indices and weights are all-gathered (they are small), each device reads its slice of
the selected rows for all tokens, and no device ever holds the whole table. When it maps
`memory_rows` instead, each device reads the selected rows it owns and the partial sums are
added across devices.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mnemax.layers.kernels.embedding_bag import embedding_bag

MEMORY_ROWS = "memory_rows"
MEMORY_DIM = "memory_dim"
MEMORY_EXPANSION = "memory_expansion"


def _mesh_axes(logical: tuple[str, ...]) -> PartitionSpec | None:
    """The mesh axes the active logical rules give `logical`, or None without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    spec = nn.logical_to_mesh_axes(logical)
    return spec if any(a is not None for a in spec) else None


def read_values(table: jax.Array, indices: jax.Array, weights: jax.Array, *,
                impl: str = "auto") -> jax.Array:
    """`out[t] = sum_j weights[t, j] * table[indices[t, j]]`.

    table `[N, d]`, indices `[T, J]` int32, weights `[T, J]` -> `[T, d]` in the table's dtype
    (accumulated in fp32), laid out by the table's sharding.
    """
    spec = _mesh_axes((MEMORY_ROWS, MEMORY_DIM))
    if spec is None:
        return embedding_bag(table, indices, weights, impl=impl)
    row_axes, dim_axes = spec[0], spec[1]
    if row_axes is None:
        fn = jax.shard_map(
            lambda t, i, w: embedding_bag(t, i, w, impl=impl),
            in_specs=(PartitionSpec(None, dim_axes), PartitionSpec(), PartitionSpec()),
            out_specs=PartitionSpec(None, dim_axes),
            check_vma=False,  # the Pallas kernels' outputs carry no varying-axes annotation
        )
        return fn(table, indices, weights)

    def local_rows(t, i, w):
        rows = t.shape[0]
        names = (row_axes,) if isinstance(row_axes, str) else row_axes
        start = jax.lax.axis_index(names) * rows
        local = i - start
        mine = (local >= 0) & (local < rows)
        part = embedding_bag(t, jnp.where(mine, local, 0), jnp.where(mine, w, 0), impl=impl)
        return jax.lax.psum(part.astype(jnp.float32), names).astype(t.dtype)

    fn = jax.shard_map(
        local_rows,
        in_specs=(PartitionSpec(row_axes, dim_axes), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(None, dim_axes),
        check_vma=False,
    )
    return fn(table, indices, weights)


def read_expanded_values(table: jax.Array, projections: jax.Array | None, indices: jax.Array,
                         weights: jax.Array, *, impl: str = "auto") -> jax.Array:
    """UltraMem's implicit value expansion.

    Virtual row `v = p * E + e` is `table[p] @ projections[e]`: table `[N / E, d_p]`,
    projections `[E, d_p, d_v]`, indices into the N virtual rows `[T, J]` -> `[T, d_v]`. The read
    groups the selected rows by projection, so each projection is applied once per token.
    """
    if projections is None:
        return read_values(table, indices, weights, impl=impl)
    expansion = projections.shape[0]
    physical, which = indices // expansion, indices % expansion
    per_projection = [read_values(table, physical, jnp.where(which == e, weights, 0), impl=impl)
                      for e in range(expansion)]
    stacked = jnp.stack(per_projection, axis=1)  # [T, E, d_p]
    return jnp.einsum("tep,epv->tv", stacked, projections.astype(stacked.dtype))


def slot_statistics(indices: jax.Array, weights: jax.Array, num_rows: int) -> dict[str, jax.Array]:
    """Memory usage of a batch: the fraction of slots read at least once, and the entropy
    (nats) of the total weight each slot received, normalised by log(num_rows)."""
    flat_i = jax.lax.stop_gradient(indices).reshape(-1)
    flat_w = jax.lax.stop_gradient(weights).reshape(-1).astype(jnp.float32)
    hits = jnp.zeros(num_rows, jnp.float32).at[flat_i].add(1.0)
    mass = jnp.zeros(num_rows, jnp.float32).at[flat_i].add(flat_w)
    p = mass / jnp.maximum(jnp.sum(mass), 1e-9)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"memory/usage": jnp.mean(hits > 0),
            "memory/weight_entropy": entropy / jnp.log(float(num_rows))}
