"""The embedding bag in plain jnp: the ground truth, and the XLA path off the kernels' platforms.

Also the backward written out (gather + dot for d_weights; stable sort by row and a sorted
segment sum for d_table), which the `reference` impl runs so that its d_table is deterministic
and sums each row's contributions in token order like the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference(table: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """Plain jnp embedding bag: `[N, d], [..., K], [..., K] -> [..., d]` in table dtype."""
    rows = jnp.take(table, indices, axis=0).astype(jnp.float32)  # [..., K, d]
    out = jnp.einsum("...k,...kd->...d", weights.astype(jnp.float32), rows)
    return out.astype(table.dtype)


def sort_by_row(indices: jax.Array, weights: jax.Array, num_rows: int | None = None):
    """Flat `(rows, tokens, weights)` of `indices/weights [T, K]`, stably sorted by row.

    With `num_rows`, a pick of weight 0 (padding, or a pick that row sharding gives another
    shard) gets the sentinel row `num_rows`, which sorts after every real row: the kernels skip
    it instead of adding `0 * d_out` (NaN where d_out is not finite) into a long row-0 segment.
    """
    flat = indices.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1)
    if num_rows is not None:
        flat = jnp.where(w != 0, flat, num_rows)
    pos = jnp.arange(flat.shape[0], dtype=jnp.int32)
    rows, pos = jax.lax.sort((flat, pos), num_keys=1, is_stable=True)
    return rows, pos // indices.shape[1], w[pos].astype(jnp.float32)


def reference_d_weights(table: jax.Array, indices: jax.Array, d_out: jax.Array) -> jax.Array:
    """`d_weights[t, k] = d_out[t] . table[indices[t, k]]`, fp32: `[T, d], [T, K], [T, d] ->
    [T, K]`."""
    rows = jnp.take(table, indices, axis=0).astype(jnp.float32)
    return jnp.einsum("td,tkd->tk", d_out.astype(jnp.float32), rows)


def reference_d_table(table: jax.Array, indices: jax.Array, weights: jax.Array,
                      d_out: jax.Array) -> jax.Array:
    """`d_table[r] = sum_{t, k: indices[t, k] = r} weights[t, k] * d_out[t]`: `[N, d]` in table
    dtype, each row summed in token order (sort by row, sorted segment sum)."""
    srows, stoks, sw = sort_by_row(indices, weights)
    contrib = sw[:, None] * d_out[stoks].astype(jnp.float32)
    d_table = jax.ops.segment_sum(contrib, srows, num_segments=table.shape[0],
                                  indices_are_sorted=True)
    return d_table.astype(table.dtype)


def reference_backward(table, indices, weights, d_out):
    """`(d_table, d_weights)` in jnp, in table and weights dtype; `indices [T, K]`."""
    d_weights = reference_d_weights(table, indices, d_out)
    return reference_d_table(table, indices, weights, d_out), d_weights.astype(weights.dtype)
