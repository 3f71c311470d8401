"""Dot products of picked table rows with a token's vector: PEER's expert down projection.

`act[t, j] = table[indices[t, j]] . x[t]` (He 2024, "Mixture of A Million Experts", Eq. 3: the
retrieved expert `e_i(x) = sigma(u_i^T x) v_i` reads its down vector `u_i`; UltraMemV2 the same
with `x` projected first). This is the embedding bag's d_weights with `d_out = x`, and its
gradients are the other two embedding-bag kernels, so no `[T, J, d]` tensor of gathered rows is
built on the kernel path:

- `d_x[t] = sum_j g[t, j] * table[indices[t, j]]`: the embedding-bag forward with weights `g`;
- `d_table[r] = sum_{(t, j): indices[t, j] = r} g[t, j] * x[t]`: the embedding-bag d_table with
  weights `g` and `d_out = x` (sorted, deterministic, fp32 sums).

Shapes and dtypes: table `[N, d]` fp32/bf16, indices `[..., J]` int in [0, N), x `[..., d]` ->
act `[..., J]` fp32 (fp32 accumulation); `d_x` in x's dtype, `d_table` in the table's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mnemax.errors import ConfigError
from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.embedding_bag import pallas_gpu, pallas_tpu
from mnemax.layers.kernels.embedding_bag.op import select_bag_op
from mnemax.layers.kernels.embedding_bag.reference import reference_d_table, reference_d_weights


def row_dot_reference(table: jax.Array, indices: jax.Array, x: jax.Array) -> jax.Array:
    """Plain jnp: `[N, d], [T, J], [T, d] -> [T, J]` fp32 (gathers `[T, J, d]`)."""
    return reference_d_weights(table, indices, x)


def _with_vjp(dots: Callable, bag: Callable, d_table: Callable) -> Callable:
    """The custom_vjp op on `[T, J]` indices from embedding-bag functions: `dots` (d_weights
    shaped), `bag(table, indices, weights, out_dtype)` and `d_table`."""

    @jax.custom_vjp
    def op(table, indices, x):
        return dots(table, indices, x)[:, : indices.shape[1]]

    def fwd(table, indices, x):
        return op(table, indices, x), (table, indices, x)

    def bwd(res, g):
        table, indices, x = res
        return d_table(table, indices, g, x), None, bag(table, indices, g, x.dtype)

    op.defvjp(fwd, bwd)
    return op


def _reference_bag(table, indices, weights, out_dtype):
    rows = jnp.take(table, indices, axis=0).astype(jnp.float32)
    return jnp.einsum("tj,tjd->td", weights, rows).astype(out_dtype)


@functools.cache
def _reference_op() -> Callable:
    return _with_vjp(row_dot_reference, _reference_bag, reference_d_table)


@functools.cache
def _kernel_ops(interpret: bool) -> tuple[Callable, Callable]:
    """The (GPU, TPU) ops, compiled or in interpret mode."""
    ops = []
    for m in (pallas_gpu, pallas_tpu):
        def bag(table, indices, weights, out_dtype, m=m):
            return m.forward(table, indices, weights, out_dtype=out_dtype, interpret=interpret)

        ops.append(_with_vjp(functools.partial(m.d_weights, interpret=interpret), bag,
                             functools.partial(m.d_table, interpret=interpret)))
    return tuple(ops)


def row_dot(table: jax.Array, indices: jax.Array, x: jax.Array, *, impl: str = "auto",
            interpret_backend: str = "gpu") -> jax.Array:
    """`act[..., j] = table[indices[..., j]] . x[...]`, fp32 accumulation.

    table `[N, d]` (fp32/bf16), indices `[..., J]` int, x `[..., d]` -> `[..., J]` fp32.
    Differentiable w.r.t. table and x. `impl`: see `dispatch.py` (the embedding bag's kernels
    and `AUTO_PLATFORMS`); `interpret_backend` ("gpu" | "tpu") picks the kernel that
    "pallas_interpret" runs.
    """
    dispatch.check_impl(impl, interpret_backend)
    if table.ndim != 2:
        raise ConfigError(f"row_dot: table must be [N, d], got shape {table.shape}; pass the "
                          "expert table itself, not a stack of them.")
    lead, d = indices.shape[:-1], table.shape[1]
    if indices.ndim < 1 or x.shape != (*lead, d):
        raise ConfigError(f"row_dot: x {x.shape} must be indices' leading dims + the table "
                          f"width, {(*lead, d)} (indices {indices.shape}, table {table.shape}).")
    j = indices.shape[-1]
    idx2 = indices.reshape(-1, j).astype(jnp.int32)
    x2 = x.reshape(-1, d)
    fn = select_bag_op(impl, table.shape, idx2.shape[0], _reference_op(), _kernel_ops,
                       interpret_backend)
    return fn(table, idx2, x2).reshape(*lead, j)

