"""Weighted embedding bag: the value read of product-key memory layers.

`out[t] = sum_k weights[t, k] * table[indices[t, k]]` (Lample et al. 2019; Memory+, Berges et al.
2024, whose custom GPU embedding-bag backward this mirrors; PEER's expert read has the same shape).

Shapes and dtypes:
- `table [N, d]` fp32 or bf16; `indices [..., K]` int32 in [0, N); `weights [..., K]` float.
- `out [..., d]` in **table dtype** (Memory+ consumes the memory output in the model's compute
  dtype, which is the dtype the table is cast to), accumulated in fp32 whatever the table dtype.
- Gradients: `d_weights[t, k] = d_out[t] . table[indices[t, k]]` (fp32 accumulation, returned in
  weights dtype) and `d_table[r] = sum_{(t, k): indices[t, k] = r} weights[t, k] * d_out[t]`
  (returned in table dtype). Heads are folded into K by the caller (`[T, H, K] -> [T, H*K]`).

Determinism: d_table never uses float atomics. The (row, token, weight) triples are sorted by row
with a stable sort, so every row's contributions are summed by one program in token order; two
runs give bitwise-equal gradients.

Kernels (all run under `interpret=True` on CPU in tests, see `dispatch.py` for `impl`):
- GPU (Triton): forward grid `(T, d / bd)`, one program gathers its token's K rows' d-slice in
  chunks of `bk` rows and accumulates in fp32 registers. d_weights grid `(T,)`: K-chunk gathers
  dotted with `d_out[t]`. d_table grid `(N / br, d / bd)`: CSR over the sorted triples, each
  program owns `br` whole output rows and loops to the largest segment in its block, so every
  row of d_table (touched or not) is written exactly once.
- TPU (Mosaic): indices / weights arrive in SMEM blocks per grid step (the full index array
  of a real step, T*K*4 bytes = 8 MiB, is larger than SMEM, so a whole-array scalar prefetch is
  not used); table rows are gathered by DMA from HBM into VMEM, double-buffered across tokens.
  d_table walks the sorted triples sequentially ("arbitrary" grid axis), keeps the running row
  sum in VMEM and DMAs each finished row into an output aliased to zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels import dispatch

# Tiling. GPU: `bd` columns per program (power of two, 16..256), gathers of `bk` rows at a time,
# `br` rows of d_table per program. TPU: `bd` a multiple of 128 lanes, `bt` tokens per step,
# `be` sorted triples per d_table step.
GPU_MAX_BD, GPU_BK, GPU_BR, GPU_NUM_WARPS = 256, 16, 16, 4
TPU_MAX_BD, TPU_BT, TPU_BE = 512, 8, 128


def reference(table: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """Plain jnp embedding bag: `[N, d], [..., K], [..., K] -> [..., d]` in table dtype."""
    rows = jnp.take(table, indices, axis=0).astype(jnp.float32)  # [..., K, d]
    out = jnp.einsum("...k,...kd->...d", weights.astype(jnp.float32), rows)
    return out.astype(table.dtype)


def sort_by_row(indices: jax.Array, weights: jax.Array):
    """Flat `(rows, tokens, weights)` of `indices/weights [T, K]`, stably sorted by row."""
    flat = indices.reshape(-1).astype(jnp.int32)
    pos = jnp.arange(flat.shape[0], dtype=jnp.int32)
    rows, pos = jax.lax.sort((flat, pos), num_keys=1, is_stable=True)
    return rows, pos // indices.shape[1], weights.reshape(-1)[pos].astype(jnp.float32)


def reference_backward(table, indices, weights, d_out):
    """`(d_table, d_weights)` in jnp: gather + dot, and sort + sorted segment sum."""
    rows = jnp.take(table, indices, axis=0).astype(jnp.float32)
    d_weights = jnp.einsum("td,tkd->tk", d_out.astype(jnp.float32), rows)
    srows, stoks, sw = sort_by_row(indices, weights)
    contrib = sw[:, None] * d_out[stoks].astype(jnp.float32)
    d_table = jax.ops.segment_sum(contrib, srows, num_segments=table.shape[0],
                                  indices_are_sorted=True)
    return d_table.astype(table.dtype), d_weights.astype(weights.dtype)


def _row_segments(srows: jax.Array, num_rows: int):
    """CSR of the sorted rows: `(starts, counts)` per table row, int32 `[num_rows]`."""
    counts = jnp.zeros((num_rows,), jnp.int32).at[srows].add(1)
    return jnp.cumsum(counts) - counts, counts


def _pow2_block(d: int, cap: int) -> int:
    b = cap
    while b > 1 and d % b:
        b //= 2
    return b


def _pad_k(indices, weights, multiple):
    pad = -indices.shape[1] % multiple
    if pad:
        indices = jnp.pad(indices, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return indices, weights


# --------------------------------------------------------------------------------- GPU (Triton)

def _gpu_params():
    return plgpu.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=2)


def _gpu_fwd_kernel(idx_ref, w_ref, table_ref, out_ref, *, bk, bd):
    d0 = pl.program_id(1) * bd
    acc = jnp.zeros((bd,), jnp.float32)
    for c in range(idx_ref.shape[0] // bk):  # K / bk independent gathers: memory parallelism
        idx = idx_ref[pl.ds(c * bk, bk)]
        w = w_ref[pl.ds(c * bk, bk)].astype(jnp.float32)
        rows = table_ref[idx, pl.ds(d0, bd)].astype(jnp.float32)  # [bk, bd] gather
        acc += jnp.sum(w[:, None] * rows, axis=0)
    out_ref[...] = acc.astype(out_ref.dtype)


def _gpu_forward(table, indices, weights, *, interpret=False):
    (n, d), bd = table.shape, _pow2_block(table.shape[1], GPU_MAX_BD)
    bk = min(GPU_BK, pl.next_power_of_2(indices.shape[1]))
    indices, weights = _pad_k(indices, weights, bk)
    t, k = indices.shape
    tok = pl.BlockSpec((None, k), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, bk=bk, bd=bd),
        grid=(t, d // bd),
        in_specs=[tok, tok, pl.BlockSpec((n, d), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((None, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, d), table.dtype),
        compiler_params=_gpu_params(), interpret=interpret, name="embedding_bag_fwd",
    )(indices, weights, table)


def _gpu_dw_kernel(idx_ref, g_ref, table_ref, dw_ref, *, bk, bd):
    for c in range(idx_ref.shape[0] // bk):
        idx = idx_ref[pl.ds(c * bk, bk)]

        def body(j, acc, idx=idx):
            rows = table_ref[idx, pl.ds(j * bd, bd)].astype(jnp.float32)
            g = g_ref[pl.ds(j * bd, bd)].astype(jnp.float32)
            return acc + jnp.sum(rows * g[None, :], axis=1)

        acc = jax.lax.fori_loop(0, g_ref.shape[0] // bd, body, jnp.zeros((bk,), jnp.float32))
        dw_ref[pl.ds(c * bk, bk)] = acc


def _gpu_d_weights(table, indices, d_out, *, interpret=False):
    (n, d), bd = table.shape, _pow2_block(table.shape[1], GPU_MAX_BD)
    bk = min(GPU_BK, pl.next_power_of_2(indices.shape[1]))
    indices, _ = _pad_k(indices, indices, bk)
    t, k = indices.shape
    return pl.pallas_call(
        functools.partial(_gpu_dw_kernel, bk=bk, bd=bd),
        grid=(t,),
        in_specs=[pl.BlockSpec((None, k), lambda i: (i, 0)),
                  pl.BlockSpec((None, d), lambda i: (i, 0)),
                  pl.BlockSpec((n, d), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((None, k), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32),
        compiler_params=_gpu_params(), interpret=interpret, name="embedding_bag_dw",
    )(indices, d_out, table)


def _gpu_dtable_kernel(start_ref, count_ref, tok_ref, w_ref, g_ref, out_ref, *, bd):
    start, count = start_ref[...], count_ref[...]
    cols = pl.program_id(1) * bd + jax.lax.broadcasted_iota(jnp.int32, (1, bd), 1)

    def body(c, acc):  # c-th triple of every row in the block, masked past each row's end
        valid = c < count
        pos = start + c
        tok = plgpu.load(tok_ref.at[pos], mask=valid, other=0)
        w = plgpu.load(w_ref.at[pos], mask=valid, other=0.0)
        g = plgpu.load(g_ref.at[tok[:, None], cols], mask=valid[:, None], other=0.0)
        return acc + w[:, None] * g.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, jnp.max(count), body, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gpu_d_table(table, indices, weights, d_out, *, interpret=False):
    (n, d), bd = table.shape, _pow2_block(table.shape[1], GPU_MAX_BD)
    br = _pow2_block(n, GPU_BR)
    srows, stoks, sw = sort_by_row(indices, weights)
    starts, counts = _row_segments(srows, n)
    m = stoks.shape[0]
    rows = pl.BlockSpec((br,), lambda i, j: (i,))
    return pl.pallas_call(
        functools.partial(_gpu_dtable_kernel, bd=bd),
        grid=(n // br, d // bd),
        in_specs=[rows, rows, pl.BlockSpec((m,), lambda i, j: (0,)),
                  pl.BlockSpec((m,), lambda i, j: (0,)),
                  pl.BlockSpec(d_out.shape, lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((br, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        compiler_params=_gpu_params(), interpret=interpret, name="embedding_bag_dtable",
    )(starts, counts, stoks, sw, d_out)


# ---------------------------------------------------------------------------------- TPU (Mosaic)
# SMEM operands are 3-D `[steps, 1, block]` so each block's last two dims equal the array's
# (a rank-1 block would need the chip's tiling, which is unknown when lowering on a CPU host).

def _tpu_row_copy(src_hbm, row, d0, bd, dst, sem):
    return pltpu.make_async_copy(src_hbm.at[pl.ds(row, 1), pl.ds(d0, bd)], dst, sem)


def _tpu_token_loop(idx_ref, table_hbm, buf, sem, bd, consume):
    """For each token of the step: wait its K gathered rows (prefetching the next token's
    into the other slot of `buf [2, K, 1, bd]`), then `consume(t, slot)`."""
    k = buf.shape[1]
    bt = idx_ref.shape[1] // k
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)

    def start(t, slot):
        def one(j, carry):
            _tpu_row_copy(table_hbm, idx_ref[0, t * k + j], d0, bd, buf.at[slot, j],
                          sem.at[slot]).start()
            return carry

        jax.lax.fori_loop(0, k, one, 0)

    start(0, 0)

    def token(t, carry):
        slot = t % 2

        @pl.when(t + 1 < bt)
        def _():
            start(t + 1, 1 - slot)

        def wait(j, carry):  # every copy has the same size: any same-shaped descriptor waits
            _tpu_row_copy(table_hbm, 0, d0, bd, buf.at[slot, j], sem.at[slot]).wait()
            return carry

        jax.lax.fori_loop(0, k, wait, 0)
        consume(t, slot)
        return carry

    jax.lax.fori_loop(0, bt, token, 0)


def _tpu_fwd_kernel(idx_ref, w_ref, table_hbm, out_ref, buf, sem, *, bd):
    k = buf.shape[1]

    def consume(t, slot):
        def add(j, acc):
            return acc + w_ref[0, t * k + j] * buf[slot, j].astype(jnp.float32)

        acc = jax.lax.fori_loop(0, k, add, jnp.zeros((1, bd), jnp.float32))
        out_ref[pl.ds(t, 1), :] = acc.astype(out_ref.dtype)

    _tpu_token_loop(idx_ref, table_hbm, buf, sem, bd, consume)


def _tpu_blocks(indices, weights, bt):
    """Pads T to a multiple of bt; returns them as SMEM-ready `[T / bt, 1, bt * K]`."""
    pad = -indices.shape[0] % bt
    if pad:
        indices = jnp.pad(indices, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    t, k = indices.shape
    return indices.reshape(t // bt, 1, bt * k), weights.reshape(t // bt, 1, bt * k)


def _tpu_scratch(k, bd, dtype):
    return [pltpu.VMEM((2, k, 1, bd), dtype), pltpu.SemaphoreType.DMA((2,))]


def _tpu_forward(table, indices, weights, *, interpret=False):
    d, bd = table.shape[1], _pow2_block(table.shape[1], TPU_MAX_BD)
    t_in, k = indices.shape
    idx3, w3 = _tpu_blocks(indices, weights.astype(jnp.float32), TPU_BT)
    smem = pl.BlockSpec((None, 1, TPU_BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    out = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, bd=bd),
        grid=(idx3.shape[0], d // bd),
        in_specs=[smem, smem, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((TPU_BT, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((idx3.shape[0] * TPU_BT, d), table.dtype),
        scratch_shapes=_tpu_scratch(k, bd, table.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="embedding_bag_fwd",
    )(idx3, w3, table)
    return out[:t_in]


def _tpu_dw_kernel(idx_ref, g_ref, table_hbm, dw_ref, buf, sem, *, bd):
    k = buf.shape[1]

    @pl.when(pl.program_id(1) == 0)
    def _():
        def zero(j, carry):
            dw_ref[0, j] = jnp.float32(0)
            return carry

        jax.lax.fori_loop(0, dw_ref.shape[1], zero, 0)

    def consume(t, slot):
        g = g_ref[pl.ds(t, 1), :].astype(jnp.float32)

        def dot(j, carry):
            dw_ref[0, t * k + j] += jnp.sum(buf[slot, j].astype(jnp.float32) * g)
            return carry

        jax.lax.fori_loop(0, k, dot, 0)

    _tpu_token_loop(idx_ref, table_hbm, buf, sem, bd, consume)


def _tpu_d_weights(table, indices, d_out, *, interpret=False):
    d, bd = table.shape[1], _pow2_block(table.shape[1], TPU_MAX_BD)
    t_in, k = indices.shape
    idx3, _ = _tpu_blocks(indices, indices, TPU_BT)
    d_out = jnp.pad(d_out, ((0, idx3.shape[0] * TPU_BT - t_in), (0, 0)))
    smem = pl.BlockSpec((None, 1, TPU_BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    dw = pl.pallas_call(
        functools.partial(_tpu_dw_kernel, bd=bd),
        grid=(idx3.shape[0], d // bd),  # d innermost: the dw block stays resident, accumulates
        in_specs=[smem, pl.BlockSpec((TPU_BT, bd), lambda i, j: (i, j)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=smem,
        out_shape=jax.ShapeDtypeStruct(idx3.shape, jnp.float32),
        scratch_shapes=_tpu_scratch(k, bd, table.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dw",
    )(idx3, d_out, table)
    return dw.reshape(-1, k)[:t_in]


def _tpu_dtable_kernel(row_ref, tok_ref, w_ref, last_ref, g_hbm, zeros_hbm, out_hbm,
                       gbuf, acc_ref, obuf, sem, *, bd):
    del zeros_hbm  # aliased to out_hbm: rows that no triple touches stay zero
    be = gbuf.shape[0]
    d0 = pl.multiple_of(pl.program_id(0) * bd, bd)

    @pl.when(pl.program_id(1) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def start(j, carry):
        _tpu_row_copy(g_hbm, tok_ref[0, j], d0, bd, gbuf.at[j], sem.at[0]).start()
        return carry

    def wait(j, carry):
        _tpu_row_copy(g_hbm, 0, d0, bd, gbuf.at[j], sem.at[0]).wait()
        return carry

    jax.lax.fori_loop(0, be, start, 0)
    jax.lax.fori_loop(0, be, wait, 0)

    def entry(j, carry):
        acc_ref[...] += w_ref[0, j] * gbuf[j].astype(jnp.float32)

        @pl.when(last_ref[0, j] != 0)  # the row's segment ends here: write it once, reset
        def _():
            obuf[...] = acc_ref[...].astype(obuf.dtype)
            pltpu.sync_copy(obuf, out_hbm.at[pl.ds(row_ref[0, j], 1), pl.ds(d0, bd)])
            acc_ref[...] = jnp.zeros_like(acc_ref)

        return carry

    jax.lax.fori_loop(0, be, entry, 0)


def _tpu_d_table(table, indices, weights, d_out, *, interpret=False):
    (n, d), bd = table.shape, _pow2_block(table.shape[1], TPU_MAX_BD)
    srows, stoks, sw = sort_by_row(indices, weights)
    last = jnp.append(srows[1:] != srows[:-1], True).astype(jnp.int32)
    pad = -srows.shape[0] % TPU_BE  # padded triples add 0 to an accumulator never written
    srows, stoks, sw, last = (jnp.pad(a, (0, pad)).reshape(-1, 1, TPU_BE)
                              for a in (srows, stoks, sw, last))
    smem = pl.BlockSpec((None, 1, TPU_BE), lambda j, e: (e, 0, 0), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_tpu_dtable_kernel, bd=bd),
        grid=(d // bd, srows.shape[0]),
        in_specs=[smem, smem, smem, smem, hbm, hbm],
        out_specs=hbm,
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        scratch_shapes=[pltpu.VMEM((TPU_BE, 1, bd), d_out.dtype), pltpu.VMEM((1, bd), jnp.float32),
                        pltpu.VMEM((1, bd), table.dtype), pltpu.SemaphoreType.DMA((1,))],
        input_output_aliases={5: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dtable",
    )(srows, stoks, sw, last, d_out, jnp.zeros((n, d), table.dtype))


# ------------------------------------------------------------------------------ custom_vjp, API

def _with_vjp(forward, d_weights, d_table):
    """A custom_vjp op on 2-D `[T, K]` indices from forward / backward kernels."""

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
def _reference_op():
    def forward(table, indices, weights):
        return reference(table, indices, weights)

    def dw(table, indices, d_out):
        rows = jnp.take(table, indices, axis=0).astype(jnp.float32)
        return jnp.einsum("td,tkd->tk", d_out.astype(jnp.float32), rows)

    def dt(table, indices, weights, d_out):
        return reference_backward(table, indices, weights, d_out)[0]

    return _with_vjp(forward, dw, dt)


@functools.cache
def _ops(interpret: bool):
    p = functools.partial
    gpu = _with_vjp(p(_gpu_forward, interpret=interpret), p(_gpu_d_weights, interpret=interpret),
                    p(_gpu_d_table, interpret=interpret))
    tpu = _with_vjp(p(_tpu_forward, interpret=interpret), p(_tpu_d_weights, interpret=interpret),
                    p(_tpu_d_table, interpret=interpret))
    return gpu, tpu


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
    gpu, tpu = _ops(False)
    gpu_i, tpu_i = _ops(True)
    gpu_ok, tpu_ok = d % 16 == 0, d % 128 == 0  # otherwise that platform runs the reference
    fn = dispatch.select(impl, reference=_reference_op(),
                         gpu=gpu if gpu_ok else None, tpu=tpu if tpu_ok else None,
                         gpu_interpret=gpu_i if gpu_ok else None,
                         tpu_interpret=tpu_i if tpu_ok else None,
                         interpret_backend=interpret_backend)
    return fn(table, idx2, w2).reshape(*lead, d)
