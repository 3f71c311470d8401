"""The public block-sparse attention op: input checks and backend choice.

Backends (`dispatch.select`): "reference" is the gathered-block XLA path (`blocks.py`); the
Triton kernels (`pallas_gpu.py`) and the Mosaic kernels (`pallas_tpu.py`) own their
`custom_vjp`s. Shapes a kernel cannot take run the XLA path on that platform, with a one-line
notice when a kernel was asked for. `AUTO_PLATFORMS` is empty: no kernel has been measured
on a GPU or TPU yet, so "auto" is the XLA path everywhere ("a kernel is a platform's default
only when measured there").
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mnemax.layers import axes
from mnemax.layers.kernels import dispatch
from mnemax.layers.kernels.block_sparse_attention import blocks, pallas_gpu, pallas_tpu
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks

AUTO_PLATFORMS: tuple[str, ...] = ()


def check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                 slot_mask: jax.Array | None, block_size: int, window: int | None,
                 query_block: int | None = None) -> None:
    """Raises ValueError naming the first input that breaks the op's contract."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q {q.shape} must be [batch, T, heads, d] and k {k.shape}, v {v.shape} "
                         "both [batch, T, kv_heads, d].")
    batch, seq_len, heads, d = q.shape
    if k.shape[:2] != (batch, seq_len) or k.shape[3] != d:
        raise ValueError(f"k, v {k.shape} must share batch, T and d with q {q.shape}.")
    if heads % k.shape[2]:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={k.shape[2]} (GQA: q "
                         "head n reads kv head n // (heads / kv_heads)).")
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in (q, k, v)) or not (
            q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}; cast them to the compute dtype first.")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an int >= 1 (tokens per key "
                         "block).")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r}: a window holds at least the query itself "
                         "(an int >= 1), or None for no window.")
    if query_block is not None and (not isinstance(query_block, int) or query_block < 1
                                    or block_size % query_block):
        raise ValueError(f"query_block={query_block!r} must be an int >= 1 dividing block_size="
                         f"{block_size} (a query group lies inside one key block), or None for "
                         "block_size.")
    n = num_blocks(seq_len, query_block or block_size)
    if (block_indices.ndim != 4 or block_indices.shape[:3] != (batch, heads, n)
            or block_indices.shape[3] < 1):
        raise ValueError(f"block_indices {block_indices.shape} must be [batch, heads, "
                         f"ceil(T / query_block), L] = [{batch}, {heads}, {n}, L >= 1].")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
        raise ValueError(f"block_indices must be integers (key block numbers, -1 for an unused "
                         f"slot), got {block_indices.dtype}.")
    if slot_mask is not None:
        want = (batch, heads, seq_len, block_indices.shape[3])
        if slot_mask.shape != want or slot_mask.dtype != jnp.bool_:
            raise ValueError(f"slot_mask {slot_mask.shape} {slot_mask.dtype} must be bool "
                             f"[batch, heads, T, L] = {list(want)}, or None.")


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
                           slot_mask: jax.Array | None = None, *, block_size: int,
                           window: int | None = None, scale: float | None = None,
                           query_block: int | None = None, shared_group_lists: bool = False,
                           impl: dispatch.Impl = "auto", interpret_backend: str = "gpu",
                           spec: PartitionSpec | None = None) -> jax.Array:
    """Attention of each query group to the key blocks it lists (semantics: the module
    docstring of `masked_reference.py`).

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]`, block_indices
    `[batch, heads, ceil(T / query_block), L]` int (-1: unused slot; the valid entries of a
    list are distinct; key blocks hold `block_size` tokens, query groups `query_block`, a
    divisor of block_size, default block_size), slot_mask `[batch, heads, T, L]` bool or None
    (every query reads every listed block) -> `[batch, T, heads, d]` in q's dtype, scores and
    softmax in fp32. `scale` defaults to `d ** -0.5`. Differentiable w.r.t. q, k, v. `impl`:
    see `dispatch.py`; `interpret_backend` ("gpu" | "tpu") picks the kernel "pallas_interpret"
    runs. `spec`: how `[batch, T, heads, d]` is split over the mesh in context (None: no mesh);
    a kernel then runs per device in `shard_map` over batch and heads (the time entry is
    ignored: a query group may list any key block), where GSPMD would gather its inputs.
    `shared_group_lists`: the caller promises that the q heads of each GQA group list the same
    blocks (NSA, Eq. 10; slot masks may differ); the GPU kernel then loads each listed block
    once for the group's heads together (`pallas_gpu.attention`). Other paths ignore it.
    """
    dispatch.check_impl(impl, interpret_backend)
    check_inputs(q, k, v, block_indices, slot_mask, block_size, window, query_block)
    batch, seq_len, heads, d = q.shape
    slots = block_indices.shape[3]
    query_block = query_block or block_size
    if slot_mask is None:
        slot_mask = jnp.ones((batch, heads, seq_len, slots), jnp.bool_)
    scale = d ** -0.5 if scale is None else float(scale)
    static = dict(block_size=block_size, window=window, scale=scale, query_block=query_block)
    reference = functools.partial(blocks.attention, **static)
    notice = impl in ("pallas", "pallas_interpret")
    gpu = gpu_interpret = None
    if pallas_gpu.supported(block_size, d, query_block):
        gpu = functools.partial(pallas_gpu.attention, interpret=False,
                                shared_group_lists=shared_group_lists, **static)
        gpu_interpret = functools.partial(pallas_gpu.attention, interpret=True,
                                          shared_group_lists=shared_group_lists, **static)
    elif notice and interpret_backend == "gpu":
        warnings.warn(f"block_sparse_attention: the GPU kernel needs block_size, query_block and "
                      f"d powers of two >= 16 (got {block_size}, {query_block}, {d}); using the "
                      "XLA path.", stacklevel=2)
        gpu_interpret = reference
    compiled_reason = pallas_tpu.unsupported_reason(d, block_size, slots,
                                                    query_block=query_block)
    interpret_reason = pallas_tpu.unsupported_reason(d, block_size, slots, interpret=True,
                                                     query_block=query_block)
    tpu = (functools.partial(pallas_tpu.attention, interpret=False, **static)
           if compiled_reason is None else None)
    tpu_interpret = (functools.partial(pallas_tpu.attention, interpret=True, **static)
                     if interpret_reason is None else reference)
    reason = interpret_reason if impl == "pallas_interpret" else compiled_reason
    if notice and interpret_backend == "tpu" and reason is not None:
        warnings.warn(f"block_sparse_attention: no TPU kernel ({reason}); using the XLA path.",
                      stacklevel=2)
    fn = dispatch.select(impl, reference=reference, gpu=gpu, tpu=tpu,
                         gpu_interpret=gpu_interpret, tpu_interpret=tpu_interpret,
                         auto_platforms=AUTO_PLATFORMS, interpret_backend=interpret_backend)
    xla_only = impl == "reference" or (impl == "auto" and not AUTO_PLATFORMS)
    if spec is not None and not xla_only:
        fn = _per_device(fn, spec, q.shape, k.shape)
    return fn(q, k, v, block_indices.astype(jnp.int32), slot_mask)


def _per_device(fn, spec: PartitionSpec, q_shape: tuple[int, ...],
                kv_shape: tuple[int, ...]):
    """`fn` in `shard_map`: batch split as `spec[0]` says and heads as `spec[2]` says, each
    only where it divides (a batch of one sequence at init, kv heads fewer than the devices:
    that axis is whole on every device, as GSPMD would compute it)."""
    batch_axes, head_axes = spec[0], spec[2] if len(spec) > 2 else None
    if q_shape[0] % axes.mesh_axis_size(batch_axes):
        batch_axes = None
    heads_split = axes.mesh_axis_size(head_axes)
    if q_shape[2] % heads_split or kv_shape[2] % heads_split:
        head_axes = None
    tokens = PartitionSpec(batch_axes, None, head_axes, None)
    lists = PartitionSpec(batch_axes, head_axes)
    return jax.shard_map(fn, in_specs=(tokens, tokens, tokens, lists, lists), out_specs=tokens,
                         check_vma=False)  # Pallas outputs carry no varying axes
