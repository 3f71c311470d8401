"""Pallas GPU (Triton) kernel for the sequential part of the chunked gated delta rule.

The chunk form (`chunk.py`) splits into per-chunk work that is independent across chunks
(the UT transform, the masked in-chunk attention: big batched matmuls that XLA does well) and a
scan over chunks that carries the `[d_k, d_v]` state. This kernel runs that scan: one program per
(batch * head, block of `d_v` columns) keeps its `[d_k, block_v]` slice of the state on chip for
the whole sequence (the state's columns never mix), and per chunk computes

    U = U0 - W S;   O = Q_decayed S + A U;   S = exp(G_C) S + K_decayed^T U

The backward is the autodiff of the XLA scan (`jax.custom_vjp`): no backward kernel yet.
Inputs are fp32, `[bh, n_chunks, C, .]`; `C`, `d_k` and the `d_v` block must be powers of two
>= 16 (Triton's `dot`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels.tiling import is_pow2

GPU_NUM_WARPS = 4
MAX_BLOCK_V = 64
HIGHEST = lax.Precision.HIGHEST  # fp32 operands stay fp32 (no TF32) in the state recurrence


def supported(chunk: int, d_k: int, d_v: int) -> bool:
    """Whether the kernel handles these sizes (Triton `dot` wants powers of two >= 16)."""
    block_v = min(d_v, MAX_BLOCK_V)
    return (is_pow2(chunk, 16) and is_pow2(d_k, 16) and is_pow2(block_v, 16)
            and d_v % block_v == 0)


def _inter_kernel(w_ref, u0_ref, attn_ref, qd_ref, kd_ref, decay_ref, s0_ref, o_ref, s_ref):
    def body(c, s):
        u = u0_ref[c] - jnp.dot(w_ref[c], s, precision=HIGHEST)
        o = jnp.dot(qd_ref[c], s, precision=HIGHEST) + jnp.dot(attn_ref[c], u, precision=HIGHEST)
        o_ref[c] = o.astype(o_ref.dtype)
        kd_u = lax.dot_general(kd_ref[c], u, (((0,), (0,)), ((), ())), precision=HIGHEST)
        return decay_ref[c][:, None] * s + kd_u

    s_ref[...] = lax.fori_loop(0, w_ref.shape[0], body, s0_ref[...])


def inter_chunk_pallas(w, u0, attn, q_decayed, k_decayed, chunk_decay, s0, *, interpret=False):
    """The scan over chunks as one Pallas call.

    `w, q_decayed, k_decayed: [bh, n, C, d_k]`, `u0: [bh, n, C, d_v]`, `attn: [bh, n, C, C]`,
    `chunk_decay: [bh, n]` (exp of the chunk's total log-decay), `s0: [bh, d_k, d_v]`, all fp32.
    Returns `(o: [bh, n, C, d_v], final state: [bh, d_k, d_v])`, fp32.
    """
    bh, n, chunk, d_k = w.shape
    d_v = u0.shape[-1]
    block_v = min(d_v, MAX_BLOCK_V)
    # A [d_k] vector per chunk, so the kernel reads a power-of-two row instead of a scalar.
    decay = jnp.broadcast_to(chunk_decay[..., None], (bh, n, d_k))
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))
    v_block = pl.BlockSpec((None, n, chunk, block_v), lambda i, j: (i, 0, 0, j))
    state_block = pl.BlockSpec((None, d_k, block_v), lambda i, j: (i, 0, j))
    return pl.pallas_call(
        _inter_kernel,
        grid=(bh, d_v // block_v),
        in_specs=[whole(n, chunk, d_k), v_block, whole(n, chunk, chunk), whole(n, chunk, d_k),
                  whole(n, chunk, d_k), whole(n, d_k), state_block],
        out_specs=[v_block, state_block],
        out_shape=[jax.ShapeDtypeStruct((bh, n, chunk, d_v), jnp.float32),
                   jax.ShapeDtypeStruct((bh, d_k, d_v), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=1),
        interpret=interpret, name="gated_delta_inter_chunk",
    )(w, u0, attn, q_decayed, k_decayed, decay, s0)


def with_xla_backward(xla_scan):
    """`custom_vjp` running `inter_chunk_pallas` forward and the vjp of `xla_scan` backward.

    `xla_scan(xs, s0) -> (o, s)` takes the same arrays in the same layout as the kernel.
    """

    def make(interpret):
        @jax.custom_vjp
        def scan(xs, s0):
            return inter_chunk_pallas(*xs, s0, interpret=interpret)

        def fwd(xs, s0):
            return scan(xs, s0), (xs, s0)

        def bwd(res, ct):
            return jax.vjp(xla_scan, *res)[1](ct)

        scan.defvjp(fwd, bwd)
        return scan

    return make(False), make(True)

