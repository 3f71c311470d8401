"""Splash attention (JAX's Pallas TPU flash attention with block-sparse masks,
`jax.experimental.pallas.ops.tpu.splash_attention`) for causal GQA, inside `shard_map`.

Follows MaxText's wrapping (`layers/attention_op.py`, `tpu_flash_attention`): q is scaled by
1/sqrt(d) first (the kernel does not scale), the kernel takes one sequence `[heads, time, d]` and
is vmapped over the batch, 512-token blocks for the forward and for the separate dq and dk/dv
backward kernels (MaxText's `sa_block_*` defaults, `sa_use_fused_bwd_kernel=False`). GQA needs no
copy of k and v: the MHA kernel reads kv head `n // (heads / kv_heads)` for q head `n`, the same
grouping as `jax.nn.dot_product_attention`, and a contiguous split of both head axes over the
devices keeps each device's q heads with their kv heads.

XLA cannot partition a custom call (under GSPMD it would gather the whole batch on every chip),
so the kernel runs per device in `shard_map`: batch and heads split as the caller's
`PartitionSpec`s say, the sequence whole (sequence parallelism splits only the residual stream
between blocks; attention needs every key).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from mnemax.layers import axes

LANES = 128  # the kernel's kv blocks are multiples of the TPU's 128 lanes
BLOCK_SIZES = (512, 256, LANES)  # tried largest first; 512 is MaxText's default


def block_size(seq_len: int) -> int | None:
    """The largest of `BLOCK_SIZES` that divides `seq_len`; None if none does."""
    return next((b for b in BLOCK_SIZES if seq_len % b == 0), None)


def shard_count(spec_entry: str | tuple[str, ...] | None) -> int:
    """Devices an axis is split over: the product of the mesh axes a PartitionSpec entry names."""
    return axes.mesh_axis_size(spec_entry)


def unsupported_reason(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], block: int | None,
                       spec: PartitionSpec | None) -> str | None:
    """Why splash cannot take these shapes (a short phrase), or None if it can.

    q_shape `[batch, time, heads, d]`, kv_shape `[batch, time, kv_heads, d]`; `spec` splits
    `[batch, time, heads, d]` over the mesh in context (None: no split).
    """
    batch, seq_len, heads, _ = q_shape
    kv_heads = kv_shape[2]
    if block is None:
        return f"sequence length {seq_len} is not a multiple of {LANES}"
    if seq_len % block or block % LANES:
        return f"block {block} must be a multiple of {LANES} that divides the sequence {seq_len}"
    if spec is not None:
        batch_shards, head_shards = shard_count(spec[0]), shard_count(spec[2])
        if batch % batch_shards:
            return f"batch {batch} does not split over {batch_shards} devices"
        if heads % head_shards or kv_heads % head_shards:
            return (f"{heads} heads / {kv_heads} kv heads do not split over {head_shards} "
                    "devices")
    return None


def _splash_kernel(seq_len: int, heads: int, window: int | None, block: int,
                   residual_name: str | None, interpret: bool) -> kernel.SplashAttentionKernel:
    """The kernel for one device's `heads` q heads of one sequence."""
    shape = (seq_len, seq_len)
    # Key j is visible to query i when i - (window - 1) <= j <= i: LocalMask's (left, right)
    # window with right = 0 is causal by itself.
    mask = (masks.CausalMask(shape) if window is None
            else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    sizes = kernel.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)
    return kernel.make_splash_mha(
        masks.MultiHeadMask((mask,) * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        residual_checkpoint_name=residual_name, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, window: int | None,
                     block: int, spec: PartitionSpec | None, residual_name: str | None,
                     interpret: bool) -> jax.Array:
    """Causal GQA with the splash kernel.

    q `[batch, time, heads, d]`, k, v `[batch, time, kv_heads, d]` -> `[batch, time, heads, d]`
    in q's dtype (the kernel accumulates in fp32). `spec`: how `[batch, time, heads, d]` is split
    over the mesh in context (its time entry must be None); None runs on the whole arrays without
    `shard_map`. `residual_name`: `checkpoint_name` of the kernel's residuals (its output and
    log-sum-exp), so that a remat policy saving it skips recomputing the forward kernel.
    `interpret`: run the kernel in Pallas interpret mode (any platform; for tests).
    """
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)

    def local(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        splash = _splash_kernel(q.shape[1], q.shape[2], window, block, residual_name, interpret)
        heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [b, t, h, d] <-> [b, h, t, d]
        out = jax.vmap(splash)(heads_major(q), heads_major(k), heads_major(v))
        return heads_major(out)

    if spec is None:
        return local(q, k, v)
    if spec[1] is not None:
        raise ValueError(f"splash_attention: the time axis must not be split (spec {spec}); "
                         "the kernel needs every key of the sequence.")
    return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)  # Pallas outputs carry no varying-axes type
