"""Mosaic (Pallas TPU) kernels of the embedding bag: forward, d_weights and d_table.

Indices / weights arrive in SMEM blocks per grid step (the full index array of a real step,
T*K*4 bytes = 8 MiB, is larger than SMEM, so a whole-array scalar prefetch is not used); table
rows are gathered by DMA from HBM into VMEM, double-buffered across tokens. d_table walks the
(row, token, weight) triples sorted by row sequentially ("arbitrary" grid axis), keeps the running
row sum in VMEM and DMAs each finished row into an output aliased to zeros.

SMEM operands are 3-D `[steps, 1, block]` so each block's last two dims equal the array's (a
rank-1 block would need the chip's tiling, which is unknown when lowering on a CPU host).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mnemax.layers.kernels.embedding_bag.reference import sort_by_row
from mnemax.layers.kernels.tiling import pow2_block

# `bd` a multiple of 128 lanes, `bt` tokens per step, `be` sorted triples per d_table step.
MAX_BD, BT, BE = 512, 8, 128


def supported(d: int) -> bool:
    """Whether the kernels handle value width `d` (whole 128-lane blocks)."""
    return d % 128 == 0


def _row_copy(src_hbm, row, d0, bd, dst, sem):
    return pltpu.make_async_copy(src_hbm.at[pl.ds(row, 1), pl.ds(d0, bd)], dst, sem)


def _token_loop(idx_ref, table_hbm, buf, sem, bd, consume):
    """For each token of the step: wait its K gathered rows (prefetching the next token's
    into the other slot of `buf [2, K, 1, bd]`), then `consume(t, slot)`."""
    k = buf.shape[1]
    bt = idx_ref.shape[1] // k
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)

    def start(t, slot):
        def one(j, carry):
            _row_copy(table_hbm, idx_ref[0, t * k + j], d0, bd, buf.at[slot, j],
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
            _row_copy(table_hbm, 0, d0, bd, buf.at[slot, j], sem.at[slot]).wait()
            return carry

        jax.lax.fori_loop(0, k, wait, 0)
        consume(t, slot)
        return carry

    jax.lax.fori_loop(0, bt, token, 0)


def _fwd_kernel(idx_ref, w_ref, table_hbm, out_ref, buf, sem, *, bd):
    k = buf.shape[1]

    def consume(t, slot):
        def add(j, acc):
            return acc + w_ref[0, t * k + j] * buf[slot, j].astype(jnp.float32)

        acc = jax.lax.fori_loop(0, k, add, jnp.zeros((1, bd), jnp.float32))
        out_ref[pl.ds(t, 1), :] = acc.astype(out_ref.dtype)

    _token_loop(idx_ref, table_hbm, buf, sem, bd, consume)


def _blocks(indices, weights, bt):
    """Pads T to a multiple of bt; returns them as SMEM-ready `[T / bt, 1, bt * K]`."""
    pad = -indices.shape[0] % bt
    if pad:
        indices = jnp.pad(indices, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    t, k = indices.shape
    return indices.reshape(t // bt, 1, bt * k), weights.reshape(t // bt, 1, bt * k)


def _scratch(k, bd, dtype):
    return [pltpu.VMEM((2, k, 1, bd), dtype), pltpu.SemaphoreType.DMA((2,))]


def forward(table, indices, weights, *, interpret=False):
    d, bd = table.shape[1], pow2_block(table.shape[1], MAX_BD)
    t_in, k = indices.shape
    idx3, w3 = _blocks(indices, weights.astype(jnp.float32), BT)
    smem = pl.BlockSpec((None, 1, BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, bd=bd),
        grid=(idx3.shape[0], d // bd),
        in_specs=[smem, smem, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((BT, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((idx3.shape[0] * BT, d), table.dtype),
        scratch_shapes=_scratch(k, bd, table.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="embedding_bag_fwd",
    )(idx3, w3, table)
    return out[:t_in]


def _dw_kernel(idx_ref, g_ref, table_hbm, dw_ref, buf, sem, *, bd):
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

    _token_loop(idx_ref, table_hbm, buf, sem, bd, consume)


def d_weights(table, indices, d_out, *, interpret=False):
    d, bd = table.shape[1], pow2_block(table.shape[1], MAX_BD)
    t_in, k = indices.shape
    idx3, _ = _blocks(indices, indices, BT)
    d_out = jnp.pad(d_out, ((0, idx3.shape[0] * BT - t_in), (0, 0)))
    smem = pl.BlockSpec((None, 1, BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, bd=bd),
        grid=(idx3.shape[0], d // bd),  # d innermost: the dw block stays resident, accumulates
        in_specs=[smem, pl.BlockSpec((BT, bd), lambda i, j: (i, j)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=smem,
        out_shape=jax.ShapeDtypeStruct(idx3.shape, jnp.float32),
        scratch_shapes=_scratch(k, bd, table.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dw",
    )(idx3, d_out, table)
    return dw.reshape(-1, k)[:t_in]


def _dtable_kernel(row_ref, tok_ref, w_ref, last_ref, g_hbm, zeros_hbm, out_hbm,
                       gbuf, acc_ref, obuf, sem, *, bd):
    del zeros_hbm  # aliased to out_hbm: rows that no triple touches stay zero
    be = gbuf.shape[0]
    d0 = pl.multiple_of(pl.program_id(0) * bd, bd)

    @pl.when(pl.program_id(1) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def start(j, carry):
        _row_copy(g_hbm, tok_ref[0, j], d0, bd, gbuf.at[j], sem.at[0]).start()
        return carry

    def wait(j, carry):
        _row_copy(g_hbm, 0, d0, bd, gbuf.at[j], sem.at[0]).wait()
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


def d_table(table, indices, weights, d_out, *, interpret=False):
    (n, d), bd = table.shape, pow2_block(table.shape[1], MAX_BD)
    srows, stoks, sw = sort_by_row(indices, weights)
    last = jnp.append(srows[1:] != srows[:-1], True).astype(jnp.int32)
    pad = -srows.shape[0] % BE  # padded triples add 0 to an accumulator never written
    srows, stoks, sw, last = (jnp.pad(a, (0, pad)).reshape(-1, 1, BE)
                              for a in (srows, stoks, sw, last))
    smem = pl.BlockSpec((None, 1, BE), lambda j, e: (e, 0, 0), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_dtable_kernel, bd=bd),
        grid=(d // bd, srows.shape[0]),
        in_specs=[smem, smem, smem, smem, hbm, hbm],
        out_specs=hbm,
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        scratch_shapes=[pltpu.VMEM((BE, 1, bd), d_out.dtype), pltpu.VMEM((1, bd), jnp.float32),
                        pltpu.VMEM((1, bd), table.dtype), pltpu.SemaphoreType.DMA((1,))],
        input_output_aliases={5: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dtable",
    )(srows, stoks, sw, last, d_out, jnp.zeros((n, d), table.dtype))
