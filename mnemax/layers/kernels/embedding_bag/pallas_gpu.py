"""Triton (Pallas GPU) kernels of the embedding bag: forward, d_weights and d_table.

Forward grid `(T, d / bd)`: one program gathers its token's K rows' d-slice in chunks of `bk`
rows and accumulates in fp32 registers. d_weights grid `(T,)`: K-chunk gathers dotted with
`d_out[t]`. d_table grid `(N / br, d / bd)`: CSR over the (row, token, weight) triples sorted by
row, each program owns `br` whole output rows and loops to the largest segment in its block, so
every row of d_table (touched or not) is written exactly once, with no float atomics.
Indices arrive as `[T, K]` int32 (the op flattens leading dims).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels.embedding_bag.reference import sort_by_row
from mnemax.layers.kernels.tiling import pow2_block

# `bd` columns per program (power of two, 16..256), gathers of `bk` rows at a time, `br` rows of
# d_table per program.
MAX_BD, BK, BR, NUM_WARPS = 256, 16, 16, 4


def supported(d: int, num_rows: int = 0, num_tokens: int = 0) -> bool:
    """Whether the kernels handle value width `d` (a `bd` block of at least 16 columns) and a
    `[num_rows, d]` table read for `num_tokens` bags: Triton computes the element offsets of the
    table and of `[num_tokens, d]` in int32, so neither may hold more than 2^31 elements."""
    return d % 16 == 0 and max(num_rows, num_tokens) * d <= 2**31  # offsets < 2^31


def _row_segments(srows: jax.Array, num_rows: int):
    """CSR of the sorted rows: `(starts, counts)` per table row, int32 `[num_rows]`."""
    counts = jnp.zeros((num_rows,), jnp.int32).at[srows].add(1)
    return jnp.cumsum(counts) - counts, counts


def _pad_k(indices, weights, multiple):
    pad = -indices.shape[1] % multiple
    if pad:
        indices = jnp.pad(indices, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return indices, weights


def _params():
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=2)


def _fwd_kernel(idx_ref, w_ref, table_ref, out_ref, *, bk, bd):
    d0 = pl.program_id(1) * bd
    acc = jnp.zeros((bd,), jnp.float32)
    for c in range(idx_ref.shape[0] // bk):  # K / bk independent gathers: memory parallelism
        idx = idx_ref[pl.ds(c * bk, bk)]
        w = w_ref[pl.ds(c * bk, bk)].astype(jnp.float32)
        rows = table_ref[idx, pl.ds(d0, bd)].astype(jnp.float32)  # [bk, bd] gather
        acc += jnp.sum(w[:, None] * rows, axis=0)
    out_ref[...] = acc.astype(out_ref.dtype)


def forward(table, indices, weights, *, interpret=False):
    (n, d), bd = table.shape, pow2_block(table.shape[1], MAX_BD)
    bk = min(BK, pl.next_power_of_2(indices.shape[1]))
    indices, weights = _pad_k(indices, weights, bk)
    t, k = indices.shape
    tok = pl.BlockSpec((None, k), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, bk=bk, bd=bd),
        grid=(t, d // bd),
        in_specs=[tok, tok, pl.BlockSpec((n, d), lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((None, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, d), table.dtype),
        compiler_params=_params(), interpret=interpret, name="embedding_bag_fwd",
    )(indices, weights, table)


def _dw_kernel(idx_ref, g_ref, table_ref, dw_ref, *, bk, bd):
    for c in range(idx_ref.shape[0] // bk):
        idx = idx_ref[pl.ds(c * bk, bk)]

        def body(j, acc, idx=idx):
            rows = table_ref[idx, pl.ds(j * bd, bd)].astype(jnp.float32)
            g = g_ref[pl.ds(j * bd, bd)].astype(jnp.float32)
            return acc + jnp.sum(rows * g[None, :], axis=1)

        acc = jax.lax.fori_loop(0, g_ref.shape[0] // bd, body, jnp.zeros((bk,), jnp.float32))
        dw_ref[pl.ds(c * bk, bk)] = acc


def d_weights(table, indices, d_out, *, interpret=False):
    (n, d), bd = table.shape, pow2_block(table.shape[1], MAX_BD)
    bk = min(BK, pl.next_power_of_2(indices.shape[1]))
    indices, _ = _pad_k(indices, indices, bk)
    t, k = indices.shape
    return pl.pallas_call(
        functools.partial(_dw_kernel, bk=bk, bd=bd),
        grid=(t,),
        in_specs=[pl.BlockSpec((None, k), lambda i: (i, 0)),
                  pl.BlockSpec((None, d), lambda i: (i, 0)),
                  pl.BlockSpec((n, d), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((None, k), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((t, k), jnp.float32),
        compiler_params=_params(), interpret=interpret, name="embedding_bag_dw",
    )(indices, d_out, table)


def _dtable_kernel(start_ref, count_ref, tok_ref, w_ref, g_ref, out_ref, *, bd):
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


def d_table(table, indices, weights, d_out, *, interpret=False):
    (n, d), bd = table.shape, pow2_block(table.shape[1], MAX_BD)
    br = pow2_block(n, BR)
    srows, stoks, sw = sort_by_row(indices, weights)
    starts, counts = _row_segments(srows, n)
    m = stoks.shape[0]
    rows = pl.BlockSpec((br,), lambda i, j: (i,))
    return pl.pallas_call(
        functools.partial(_dtable_kernel, bd=bd),
        grid=(n // br, d // bd),
        in_specs=[rows, rows, pl.BlockSpec((m,), lambda i, j: (0,)),
                  pl.BlockSpec((m,), lambda i, j: (0,)),
                  pl.BlockSpec(d_out.shape, lambda i, j: (0, 0))],
        out_specs=pl.BlockSpec((br, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, d), table.dtype),
        compiler_params=_params(), interpret=interpret, name="embedding_bag_dtable",
    )(starts, counts, stoks, sw, d_out)
