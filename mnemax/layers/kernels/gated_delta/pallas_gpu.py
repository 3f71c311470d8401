"""Pallas GPU (Triton) kernel for the sequential part of the chunked gated delta rule.

The chunk form (`chunk.py`) splits into per-chunk work that is independent across chunks
(the UT transform, the masked in-chunk attention: big batched matmuls that XLA does well) and a
scan over chunks that carries the `[d_k, d_v]` state. This kernel runs that scan: one program per
(batch * head, block of `BLOCK_V` columns of `d_v`) keeps its `[d_k, BLOCK_V]` slice of the
state on chip for the whole sequence (the state's columns never mix), and per chunk computes

    U = U0 - W S;   O = Q_decayed S + A U;   S = exp(G_C) S + K_decayed^T U

Precision, as flash-linear-attention's `chunk_gated_delta_rule`: the matmul operands are bf16
(W, A, Q_decayed and K_decayed arrive in bf16; S and U are rounded to bf16 where they enter a
matmul) with fp32 accumulation, and the state itself, U0, U and O stay fp32. This runs the
matmuls on the tensor cores (wgmma on sm_90); fp32 operands (`Precision.HIGHEST`) take Triton's
FMA path, whose `[C, d_k]` operand tiles do not fit in registers: at `d_k = d_v = 128` that
compiled to a 12.6 KB stack frame with 50 KB of spill stores per thread. Each product is then
exact up to the operands' rounding (relative 2^-7 per term), about 2.5e-3 of the output's RMS at
`d = 128`, 2,048 tokens; fp32 end to end is the XLA scan (`impl="reference"`).

Block sizes: `BLOCK_V = 32` columns with 4 warps and no pipelining compiles for sm_90a without
spills at `C = 64, d_k = d_v = 128` (150 registers, 24 KB shared memory) and leaves room for 3
programs per SM; 64 columns needs 8 warps and 214 registers to avoid spilling
(`benchmarks/gpu_compile.py` prints the table; `tests/kernels/test_gpu_compile.py` checks it).
A `d_v` that is not a multiple of the block is zero-padded: zero columns of U0 and S stay zero.

The backward is the autodiff of the XLA scan (`jax.custom_vjp`): no backward kernel yet.
`C` and `d_k` must be powers of two >= 16 (Triton's `dot`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels.tiling import is_pow2

BLOCK_V = 32  # state columns per program
GPU_NUM_WARPS = 4
GPU_NUM_STAGES = 1
OPERAND_DTYPE = jnp.bfloat16


def supported(chunk: int, d_k: int, d_v: int) -> bool:
    """Whether the kernel handles these sizes (Triton `dot` wants powers of two >= 16; `d_v` is
    padded to whole column blocks)."""
    return is_pow2(chunk, 16) and is_pow2(d_k, 16) and d_v >= 1


def block_v(d_v: int) -> int:
    """Columns of the state per program: `BLOCK_V`, or `d_v` rounded up to a power of two
    (at least 16) when it is narrower."""
    return min(BLOCK_V, max(16, pl.next_power_of_2(d_v)))


def _dot(a, b, contract=((1,), (0,))):
    """`a @ b` (contracting `contract` dims) of bf16 operands, accumulated in fp32."""
    return lax.dot_general(a.astype(OPERAND_DTYPE), b.astype(OPERAND_DTYPE), (contract, ((), ())),
                           preferred_element_type=jnp.float32)


def _inter_kernel(w_ref, u0_ref, attn_ref, qd_ref, kd_ref, decay_ref, s0_ref, o_ref, s_ref):
    def body(c, s):
        u = u0_ref[c] - _dot(w_ref[c], s)
        o = _dot(qd_ref[c], s) + _dot(attn_ref[c], u)
        o_ref[c] = o.astype(o_ref.dtype)
        return decay_ref[c][:, None] * s + _dot(kd_ref[c], u, ((0,), (0,)))

    s_ref[...] = lax.fori_loop(0, w_ref.shape[0], body, s0_ref[...])


def inter_chunk_pallas(w, u0, attn, q_decayed, k_decayed, chunk_decay, s0, *, interpret=False):
    """The scan over chunks as one Pallas call.

    `w, q_decayed, k_decayed: [bh, n, C, d_k]`, `u0: [bh, n, C, d_v]`, `attn: [bh, n, C, C]`,
    `chunk_decay: [bh, n]` (exp of the chunk's total log-decay), `s0: [bh, d_k, d_v]`, fp32
    (`w, attn, q_decayed, k_decayed` may be bf16 already: they are rounded to it here).
    Returns `(o: [bh, n, C, d_v], final state: [bh, d_k, d_v])`, fp32.
    """
    bh, n, chunk, d_k = w.shape
    d_v = u0.shape[-1]
    bv = block_v(d_v)
    pad = -d_v % bv
    if pad:
        u0 = jnp.pad(u0, [(0, 0)] * 3 + [(0, pad)])
        s0 = jnp.pad(s0, [(0, 0), (0, 0), (0, pad)])
    w, attn, q_decayed, k_decayed = (x.astype(OPERAND_DTYPE)
                                     for x in (w, attn, q_decayed, k_decayed))
    # A [d_k] vector per chunk, so the kernel reads a power-of-two row instead of a scalar.
    decay = jnp.broadcast_to(chunk_decay[..., None], (bh, n, d_k)).astype(jnp.float32)
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda i, j: (i,) + (0,) * len(shape))
    v_block = pl.BlockSpec((None, n, chunk, bv), lambda i, j: (i, 0, 0, j))
    state_block = pl.BlockSpec((None, d_k, bv), lambda i, j: (i, 0, j))
    o, s = pl.pallas_call(
        _inter_kernel,
        grid=(bh, (d_v + pad) // bv),
        in_specs=[whole(n, chunk, d_k), v_block, whole(n, chunk, chunk), whole(n, chunk, d_k),
                  whole(n, chunk, d_k), whole(n, d_k), state_block],
        out_specs=[v_block, state_block],
        out_shape=[jax.ShapeDtypeStruct((bh, n, chunk, d_v + pad), jnp.float32),
                   jax.ShapeDtypeStruct((bh, d_k, d_v + pad), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=GPU_NUM_WARPS,
                                             num_stages=GPU_NUM_STAGES),
        interpret=interpret, name="gated_delta_inter_chunk",
    )(w, u0.astype(jnp.float32), attn, q_decayed, k_decayed, decay, s0.astype(jnp.float32))
    return (o[..., :d_v], s[..., :d_v]) if pad else (o, s)


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
