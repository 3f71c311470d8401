"""The public embedding-bag op: input checks, backend choice, and the `custom_vjp` that wires
each backend's forward and backward."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.embedding_bag import pallas_gpu, pallas_tpu
from mnemax.layers.kernels.embedding_bag.reference import (
    reference,
    reference_d_table,
    reference_d_weights,
)

# Where `impl="auto"` runs the kernels: nowhere until a benchmark on the platform shows them
# faster than the XLA path ("a kernel is a platform's default only when measured there"; none
# has run on a GPU or TPU yet). `impl="pallas"` selects them.
AUTO_PLATFORMS: tuple[str, ...] = ()


def _with_vjp(forward: Callable, d_weights: Callable, d_table: Callable) -> Callable:
    """A custom_vjp op on 2-D `[T, K]` indices from forward / backward functions."""

    @jax.custom_vjp
    def op(table, indices, weights):
        return forward(table, indices, weights)

    def fwd(table, indices, weights):
        return forward(table, indices, weights), (table, indices, weights)

    def bwd(res, d_out):
        table, indices, weights = res
        dw = d_weights(table, indices, d_out)[:, : indices.shape[1]]
        return d_table(table, indices, weights, d_out), None, dw.astype(weights.dtype)

    op.defvjp(fwd, bwd)
    return op


@functools.cache
def _reference_op() -> Callable:
    return _with_vjp(reference, reference_d_weights, reference_d_table)


@functools.cache
def _kernel_ops(interpret: bool) -> tuple[Callable, Callable]:
    """The (GPU, TPU) ops, compiled or in interpret mode."""
    p = functools.partial
    return tuple(
        _with_vjp(p(m.forward, interpret=interpret), p(m.d_weights, interpret=interpret),
                  p(m.d_table, interpret=interpret))
        for m in (pallas_gpu, pallas_tpu))


def embedding_bag(table: jax.Array, indices: jax.Array, weights: jax.Array, *,
                  impl: str = "auto", interpret_backend: str = "gpu") -> jax.Array:
    """`out[..., :] = sum_k weights[..., k] * table[indices[..., k]]`, fp32 accumulation.

    table `[N, d]` (fp32/bf16), indices `[..., K]` int, weights `[..., K]` -> `[..., d]` in
    table dtype. Differentiable w.r.t. table and weights. `impl`: see `dispatch.py`;
    `interpret_backend` ("gpu" | "tpu") picks the kernel that "pallas_interpret" runs.
    """
    dispatch.check_impl(impl, interpret_backend)
    if table.ndim != 2:
        raise ValueError(f"table must be [N, d], got shape {table.shape}.")
    if indices.shape != weights.shape or indices.ndim < 1:
        raise ValueError(f"indices {indices.shape} and weights {weights.shape} must both be "
                         "[..., K] with the same shape.")
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx2 = indices.reshape(-1, k).astype(jnp.int32)
    w2 = weights.reshape(-1, k)
    d = table.shape[1]
    fn = select_bag_op(impl, table.shape, idx2.shape[0], _reference_op(), _kernel_ops,
                       interpret_backend)
    return fn(table, idx2, w2).reshape(*lead, d)


def select_bag_op(impl: str, table_shape: tuple[int, int], bags: int, reference: Callable,
                  kernel_ops: Callable[[bool], tuple[Callable, Callable]],
                  interpret_backend: str | None) -> Callable:
    """`dispatch.select` for an op built on the bag kernels: `kernel_ops(interpret)` gives its
    (gpu, tpu) versions; a platform whose kernel cannot take this table width (or size) runs
    `reference`."""
    rows, d = table_shape
    gpu_ok = pallas_gpu.supported(d, rows, bags)
    tpu_ok = pallas_tpu.supported(d)
    (gpu, tpu), (gpu_i, tpu_i) = kernel_ops(False), kernel_ops(True)
    return dispatch.select(impl, reference=reference,
                           gpu=gpu if gpu_ok else None, tpu=tpu if tpu_ok else None,
                           gpu_interpret=gpu_i if gpu_ok else None,
                           tpu_interpret=tpu_i if tpu_ok else None,
                           auto_platforms=AUTO_PLATFORMS, interpret_backend=interpret_backend)
