"""Reading value rows: a weighted bag of rows of a (possibly sharded) value table.

The table has logical axes `("memory_rows", "memory_dim")`. When the strategy maps
`memory_dim` to mesh axes (Memory+'s layout), every device holds a column slice of every row:
the slot indices and weights are all-gathered (they are small), each device reads its slice of
the selected rows for all tokens, and no device ever holds the whole table. When it maps
`memory_rows` instead, each device reads the selected rows it owns and the partial sums are
added across devices. When it maps neither (`replicated`), each device reads its own tokens'
rows from its whole copy. Every layout runs the read inside `shard_map`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mnemax.layers import axes
from mnemax.layers.kernels.embedding_bag import embedding_bag, row_dot

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
    (accumulated in fp32), laid out by the table's sharding. With a mesh in context the read
    runs inside `shard_map` whatever the table's layout (XLA cannot partition the kernels' custom
    calls: under GSPMD every device would read the whole batch).
    """
    spec = _mesh_axes((MEMORY_ROWS, MEMORY_DIM))
    if spec is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return embedding_bag(table, indices, weights, impl=impl)
        return _read_replicated_table(table, indices, weights, impl=impl)
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


def _read_replicated_table(table: jax.Array, indices: jax.Array, weights: jax.Array, *,
                           impl: str) -> jax.Array:
    """`read_values` of a table every device holds whole (`memory_sharding=replicated`).

    Each device reads the rows of its own tokens: the tokens `[T, J]` are split as the
    activations' batch is (`act_batch`: `[B, time]` flattened batch-major, so a block of whole
    sequences per device), padded with zero-weight reads to a multiple of the devices; nothing
    is communicated forward. Backward, shard_map's transpose sums each device's table gradient
    over the devices (the table's cotangent over the axes its spec does not name).
    """
    token_axes = nn.logical_to_mesh_axes((axes.ACT_BATCH,))[0]
    names = () if token_axes is None else (
        (token_axes,) if isinstance(token_axes, str) else tuple(token_axes))
    shards = math.prod(jax.sharding.get_abstract_mesh().shape[n] for n in names)
    tokens = indices.shape[0]
    pad = -tokens % shards
    if pad:  # a batch too small to split evenly (one sequence at init, a short eval batch)
        indices = jnp.pad(indices, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    split = PartitionSpec(token_axes)
    fn = jax.shard_map(
        lambda t, i, w: embedding_bag(t, i, w, impl=impl),
        in_specs=(PartitionSpec(), split, split), out_specs=split,
        check_vma=False,  # the Pallas kernels' outputs carry no varying-axes annotation
    )
    out = fn(table, indices, weights)
    return out[:tokens] if pad else out


def expert_activations(table: jax.Array, indices: jax.Array, x: jax.Array, *,
                       impl: str = "auto") -> jax.Array:
    """PEER's down read: `act[t, j] = table[indices[t, j]] . x[t]`.

    table `[N, d]` (the experts' down vectors), indices `[T, J]` int32, x `[T, d]` -> `[T, J]`
    fp32, by the embedding-bag kernels (`row_dot`: no `[T, J, d]` gather, and a bag-kernel
    table gradient instead of a scatter). Laid out as `read_values` lays out the table: column
    slices give partial dot products summed over the devices; row slices give each device's
    own rows' activations (zero elsewhere), summed; a replicated table reads each device's
    tokens. Always inside `shard_map` under a mesh.
    """
    spec = _mesh_axes((MEMORY_ROWS, MEMORY_DIM))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return row_dot(table, indices, x, impl=impl)
    if spec is None:
        return _replicated_expert_activations(table, indices, x, impl=impl)
    row_axes, dim_axes = spec[0], spec[1]
    rows_names, dim_names = axes.mesh_axis_names(row_axes), axes.mesh_axis_names(dim_axes)

    def local(t, i, v):
        if rows_names:
            start = jax.lax.axis_index(rows_names) * t.shape[0]
            local_i = i - start
            mine = (local_i >= 0) & (local_i < t.shape[0])
            # The where on the output also zeroes the cotangent of other devices' picks, so
            # the table gradient skips them.
            act = jnp.where(mine, row_dot(t, jnp.where(mine, local_i, 0), v, impl=impl), 0.0)
        else:
            act = row_dot(t, i, v, impl=impl)
        return jax.lax.psum(act, rows_names + dim_names)

    fn = jax.shard_map(
        local,
        in_specs=(PartitionSpec(row_axes, dim_axes), PartitionSpec(),
                  PartitionSpec(None, dim_axes)),
        out_specs=PartitionSpec(),
        check_vma=False,  # the Pallas kernels' outputs carry no varying-axes annotation
    )
    return fn(table, indices, x)


def _replicated_expert_activations(table: jax.Array, indices: jax.Array, x: jax.Array, *,
                                   impl: str) -> jax.Array:
    """`expert_activations` of a table every device holds whole: each device its own tokens,
    split and padded as `_read_replicated_table` splits them."""
    token_axes = nn.logical_to_mesh_axes((axes.ACT_BATCH,))[0]
    shards = axes.shard_counts((axes.ACT_BATCH,))[0]
    tokens = indices.shape[0]
    pad = -tokens % shards
    if pad:
        indices = jnp.pad(indices, ((0, pad), (0, 0)))
        x = jnp.pad(x, ((0, pad), (0, 0)))
    split = PartitionSpec(token_axes)
    fn = jax.shard_map(lambda t, i, v: row_dot(t, i, v, impl=impl),
                       in_specs=(PartitionSpec(), split, split), out_specs=split,
                       check_vma=False)
    out = fn(table, indices, x)
    return out[:tokens] if pad else out


FEISTEL_ROUNDS = 4
_FEISTEL_KEYS = (0x9E3779B9, 0x7F4A7C15, 0x85EBCA6B, 0xC2B2AE35)


def _round_function(half: jax.Array, round_key: int, n: int) -> jax.Array:
    """A keyed integer hash of `half` (uint32 arithmetic, wrapping) reduced mod n."""
    h = (half.astype(jnp.uint32) + jnp.uint32(round_key)) * jnp.uint32(0x9E3779B1)
    h = (h ^ (h >> 15)) * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return (h % jnp.uint32(n)).astype(jnp.int32)


def shuffle_virtual_index(indices: jax.Array, num_rows: int) -> jax.Array:
    """UltraMem's fixed shuffle of the virtual slots (UltraMemV2 Eq. 8, s_hat =
    Shuffle(vec(S_grid)), "to eliminate some unnecessary index topology prior introduced by row
    and column scoring"): a fixed pseudo-random permutation of `[0, num_rows)`.

    The reference code stores `torch.randperm(N)`; we compute a keyed 4-round Feistel network on
    the (row, column) = divmod(v, n) pair, n^2 = num_rows: each round maps (a, b) -> (b, (a +
    F(b)) mod n), a bijection of Z_n^2 for any hash F, so the map is a permutation without an
    N-entry table to store, shard or checkpoint. `indices [...]` int32 -> same shape.
    """
    n = math.isqrt(num_rows)
    a, b = indices // n, indices % n
    for key in _FEISTEL_KEYS[:FEISTEL_ROUNDS]:
        a, b = b, (a + _round_function(b, key, n)) % n
    return a * n + b


def expanded_index(indices: jax.Array, num_rows: int, expansion: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Virtual slot -> (physical row, projection) under UltraMem's implicit value expansion:
    s = shuffle(v), row = s mod (N / E), projection = s div (N / E) (the reference code's
    `real_indice = s % value_num`, `group_indice = s // value_num`), so the E virtual slots that
    share a physical row are E scattered slots, not neighbours in the score grid."""
    physical = num_rows // expansion
    shuffled = shuffle_virtual_index(indices, num_rows)
    return shuffled % physical, shuffled // physical


def read_expanded_values(table: jax.Array, projections: jax.Array | None, rows: jax.Array,
                         which: jax.Array, weights: jax.Array) -> jax.Array:
    """UltraMem's implicit value expansion and multi-core value split, in one pass.

    table `[P, d]`; projections `[E, d, D]` (None: E = 1, no projection); rows `[T, J]`
    physical rows and which `[T, J]` projections of the J picks (`expanded_index`); weights
    `[T, J, C]`: part c (columns c*d/C..(c+1)*d/C) of a row is weighted by `weights[..., c]`
    (UltraMem's multi-core scoring). Returns `[T, D]` (`[T, d]` without projections):

        out[t] = sum_e (sum_{j: which_j = e} sum_c weights[t, j, c] table[rows_j, part c]) W_e

    (UltraMemV2 Eq. 9, o = sum_p W_p^T V^T s_hat_p). One gather of the J rows per token and one
    table-gradient write, whatever E and C: the rows are weighted into `[T, E, d]` by a one-hot
    of their projection, then each projection is applied once per token. The gather runs in
    `shard_map` laid out as `read_values` lays out the table: a device gathers only rows (or
    column slices) it holds, and what crosses devices is the `[T, E, d]` group sums, never the
    `[T, J, d]` gathered rows nor the table.
    """
    expansion = 1 if projections is None else projections.shape[0]
    grouped = _grouped_rows(table, rows, which, weights, expansion)  # [T, E, d] fp32
    if projections is None:
        return grouped[:, 0].astype(table.dtype)
    out = jnp.einsum("tep,epv->tv", grouped, projections.astype(jnp.float32))
    return out.astype(table.dtype)


def _group_sums(table: jax.Array, rows: jax.Array, which: jax.Array, weights: jax.Array,
                expansion: int, first_column: jax.Array | int, width: int) -> jax.Array:
    """`[T, E, d_local]` fp32 group sums of the picks from a table (slice) `[P_local, d_local]`
    whose first column is column `first_column` of the `width`-wide rows (a column slice under
    `memory_dim` sharding may cut through the cores' parts)."""
    picked = jnp.take(table, rows, axis=0).astype(jnp.float32)  # [T, J, d_local]
    route = jax.nn.one_hot(which, expansion, dtype=jnp.float32)  # [T, J, E]
    cores = weights.shape[-1]
    weights = weights.astype(jnp.float32)
    if cores == 1:
        return jnp.einsum("tj,tje,tjf->tef", weights[..., 0], route, picked)
    part = (first_column + jnp.arange(table.shape[1])) // (width // cores)
    column_core = jax.nn.one_hot(part, cores, dtype=jnp.float32)  # [d_local, C]
    return jnp.einsum("tjc,fc,tje,tjf->tef", weights, column_core, route, picked)


def _grouped_rows(table: jax.Array, rows: jax.Array, which: jax.Array, weights: jax.Array,
                  expansion: int) -> jax.Array:
    """`_group_sums` of the whole table, inside `shard_map` under a mesh (see
    `read_expanded_values`)."""
    width = table.shape[1]
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return _group_sums(table, rows, which, weights, expansion, 0, width)
    spec = _mesh_axes((MEMORY_ROWS, MEMORY_DIM))
    if spec is None:  # replicated: each device its own tokens
        token_axes = nn.logical_to_mesh_axes((axes.ACT_BATCH,))[0]
        shards = axes.shard_counts((axes.ACT_BATCH,))[0]
        tokens = rows.shape[0]
        pad = -tokens % shards  # zero-weight picks of row 0
        rows, which = (jnp.pad(a, ((0, pad), (0, 0))) for a in (rows, which))
        weights = jnp.pad(weights, ((0, pad), (0, 0), (0, 0)))
        split = PartitionSpec(token_axes)
        fn = jax.shard_map(
            lambda t, r, e, w: _group_sums(t, r, e, w, expansion, 0, width),
            in_specs=(PartitionSpec(), split, split, split), out_specs=split)
        return fn(table, rows, which, weights)[:tokens]
    row_names, dim_names = axes.mesh_axis_names(spec[0]), axes.mesh_axis_names(spec[1])

    def local(t, r, e, w):
        first_column = jax.lax.axis_index(dim_names) * t.shape[1] if dim_names else 0
        if row_names:
            local_r = r - jax.lax.axis_index(row_names) * t.shape[0]
            mine = (local_r >= 0) & (local_r < t.shape[0])
            r, w = jnp.where(mine, local_r, 0), jnp.where(mine[..., None], w, 0)
        sums = _group_sums(t, r, e, w, expansion, first_column, width)
        return jax.lax.psum(sums, row_names) if row_names else sums

    fn = jax.shard_map(
        local,
        in_specs=(PartitionSpec(spec[0], spec[1]), PartitionSpec(), PartitionSpec(),
                  PartitionSpec()),
        out_specs=PartitionSpec(None, None, spec[1]))
    return fn(table, rows, which, weights)


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
