"""Triton (Pallas GPU) kernels of the embedding bag: forward, d_weights and d_table.

Forward grid `(column blocks, T / BAGS)`, the column axis fastest-varying (neighbouring programs
read the same bags' index rows and neighbouring column slices of the same table rows): a program
sums `BAGS` bags over a block of `bd` columns, the whole row when `d <= MAX_ROW` (a power-of-two
block with the columns past `d` masked), gathering `bk` picked rows at a time into fp32
registers (`bk * bd <= TILE` elements, so the gathered tile stays in registers).

d_weights grid `(T,)`: K-chunk gathers dotted with `d_out[t]`.

d_table: a segmented reduction over the (row, token, weight) triples sorted by row, in chunks of
`CHUNK` consecutive triples, by levels (the up-sweep of a segmented scan, Blelloch 1990; each
level is the fix-up of the previous one's chunk boundaries). A program owns one chunk and one
column block, so its work is `CHUNK` row gathers whatever the row counts are: a hot row (skewed
usage) spreads over many programs instead of serialising one. In a chunk, each run of equal rows
is summed (a one-hot `[run, entry]` fp32 product); a run that starts and ends inside the chunk
is a finished
row and is written to d_table. The first segment (it may continue the previous chunk's last)
and the last (it may continue into the next) are written as the chunk's two boundary pieces
instead; the next level treats the pieces as triples `(row, piece, 1)`, still sorted by row, and
reduces them the same way. Each level has at most `2 / CHUNK` of the previous one's entries,
and a level of one chunk writes all its rows, so every touched row is written exactly once, by
one program, in an order fixed by the sort: deterministic, with no float atomics. Untouched rows
keep the zeros the output starts from.

Masked picks (weight 0: padding, or picks that belong to another shard under row sharding) get
the sentinel row `N`, which sorts after every real row; their gathers and writes are masked off.
(A zero weight times a non-finite `d_out` row would be NaN in autodiff; here it adds nothing.)

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

# Forward: whole rows up to MAX_ROW columns per program, gathered tiles of at most TILE elements,
# BAGS bags per program. d_weights: `bd` columns per program (power of two, 16..256), gathers of
# BK rows at a time. d_table: CHUNK sorted triples x DTABLE_BD columns per program; its run sums
# cost CHUNK FMAs per gathered element, so CHUNK = 16 keeps them below the gather's time on an
# H100/H200 (~34 fp32 TFMA/s vs 3.35-4.8 TB/s: 16 FMAs per 2-byte element ~ 1 ns per 4 KiB
# gathered either way), and DTABLE_BD = 128 keeps the [CHUNK, bd] sums at ~90 registers
# (sm_90a, `benchmarks/gpu_compile.py`; 256 columns took ~190, halving occupancy).
MAX_ROW, TILE, BAGS = 1024, 4096, 4
MAX_BD, BK, NUM_WARPS = 256, 16, 4
CHUNK, DTABLE_BD = 16, 128


def supported(d: int, num_rows: int = 0, num_tokens: int = 0) -> bool:
    """Whether the kernels handle value width `d` (a `bd` block of at least 16 columns) and a
    `[num_rows, d]` table read for `num_tokens` bags: Triton computes the element offsets of the
    table and of `[num_tokens, d]` in int32, so neither may hold more than 2^31 elements."""
    return d % 16 == 0 and max(num_rows, num_tokens) * d <= 2**31  # offsets < 2^31


def _pad_k(indices, weights, multiple):
    pad = -indices.shape[1] % multiple
    if pad:
        indices = jnp.pad(indices, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    return indices, weights


def _params():
    return plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=2)


def forward_tiling(d: int, k: int) -> tuple[int, int]:
    """`(bd, bk)` of the forward: the whole row rounded up to a power of two when it has at most
    MAX_ROW columns, else the largest power-of-two block <= MAX_ROW dividing `d`; `bk` rows per
    gather so that the `[bk, bd]` tile has at most TILE elements."""
    bd = pl.next_power_of_2(d) if d <= MAX_ROW else pow2_block(d, MAX_ROW)
    bk = max(1, min(TILE // bd, pl.next_power_of_2(k)))
    return bd, bk


def _fwd_kernel(idx_ref, w_ref, table_ref, out_ref, *, bk, bd):
    d = table_ref.shape[1]
    cols = pl.program_id(0) * bd + jax.lax.broadcasted_iota(jnp.int32, (bd,), 0)
    live = cols < d  # only a whole-row block rounded up to a power of two has dead columns
    bag0 = pl.program_id(1) * idx_ref.shape[0]

    def bag(b, carry):
        acc = jnp.zeros((bd,), jnp.float32)
        for c in range(idx_ref.shape[1] // bk):  # independent gathers: memory parallelism
            idx = idx_ref[b, pl.ds(c * bk, bk)]
            w = w_ref[b, pl.ds(c * bk, bk)].astype(jnp.float32)
            rows = plgpu.load(table_ref.at[idx[:, None], cols[None, :]], mask=live[None, :],
                              other=0.0)  # [bk, bd] gather
            acc += jnp.sum(w[:, None] * rows.astype(jnp.float32), axis=0)
        plgpu.store(out_ref.at[bag0 + b, cols], acc.astype(out_ref.dtype), mask=live)
        return carry

    jax.lax.fori_loop(0, idx_ref.shape[0], bag, 0)


def forward(table, indices, weights, *, out_dtype=None, interpret=False):
    """`[N, d], [T, K], [T, K] -> [T, d]` in `out_dtype` (default: the table's)."""
    (n, d), t_in = table.shape, indices.shape[0]
    bd, bk = forward_tiling(d, indices.shape[1])
    indices, weights = _pad_k(indices, weights, bk)
    t_pad = -t_in % BAGS  # padded bags read row 0 with weight 0; sliced off below
    indices, weights = (jnp.pad(a, ((0, t_pad), (0, 0))) for a in (indices, weights))
    t, k = indices.shape
    bags = pl.BlockSpec((BAGS, k), lambda j, i: (i, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda j, i: (0, 0))
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, bk=bk, bd=bd),
        grid=(pl.cdiv(d, bd), t // BAGS),
        in_specs=[bags, bags, whole((n, d))],
        out_specs=whole((t, d)),
        out_shape=jax.ShapeDtypeStruct((t, d), out_dtype or table.dtype),
        compiler_params=_params(), interpret=interpret, name="embedding_bag_fwd",
    )(indices, weights, table)
    return out[:t_in]


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


def _segment_kernel(row_ref, seg_ref, pos_ref, w_ref, src_ref, out_in_ref, out_ref, *piece_ref,
                    bd, final):
    """One chunk of sorted `(row, source row, weight)` entries with their run number in the chunk
    (`seg`), one column block: sums each run's `w * src[pos]`, writes the runs that start and end
    in the chunk (every run if `final`) to their rows, and the first and last runs into
    `piece_ref [2, bd]` (the last as 0 if it is the first)."""
    del out_in_ref  # aliased to out_ref: rows no level writes keep their zeros
    n, chunk = out_ref.shape[0], row_ref.shape[0]
    cols = pl.program_id(0) * bd + jax.lax.broadcasted_iota(jnp.int32, (bd,), 0)
    rows, seg = row_ref[...], seg_ref[...]
    real = rows < n
    g = plgpu.load(src_ref.at[pos_ref[...][:, None], cols[None, :]], mask=real[:, None],
                   other=0.0)  # [chunk, bd] gather
    terms = w_ref[...][:, None] * g.astype(jnp.float32)
    runs = jax.lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)  # [run, entry]
    member = seg[None, :] == runs
    # Run sums as a one-hot product [run, entry] x [entry, bd]. IEEE fp32 (HIGHEST, FMAs, no
    # TF32): the products are exact (1 * x, 0 * x), so each run is an fp32 sum of its own terms
    # in a fixed order (other runs add exact zeros); no atomics, so deterministic.
    sums = jax.lax.dot(member.astype(jnp.float32), terms, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)  # [run, bd]
    run_row = jnp.max(jnp.where(member, rows[None, :], -1), axis=1)  # [run]; -1: no such run
    last_run = jnp.max(seg)
    run = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    write = (run_row >= 0) & (run_row < n)
    if not final:
        write = write & (run != 0) & (run != last_run)
        head = jnp.sum(jnp.where(run[:, None] == 0, sums, 0.0), axis=0)
        tail = jnp.sum(jnp.where((run[:, None] == last_run) & (last_run != 0), sums, 0.0),
                       axis=0)
        piece_ref[0][0, :] = head
        piece_ref[0][1, :] = tail
    # Masked-off runs address row n: never touched on the GPU, and dropped as out of bounds by
    # interpret mode, which writes masked lanes back with their old value (a masked lane aliasing
    # a written row there could undo the write).
    plgpu.store(out_ref.at[jnp.where(write, run_row, n)[:, None], cols[None, :]],
                sums.astype(out_ref.dtype), mask=write[:, None])


def _segment_level(rows, pos, w, src, out, *, bd, interpret):
    """One level of the segmented reduction: `(out, (rows, pieces [2 * chunks, d]) or None)`."""
    pad = -rows.shape[0] % CHUNK  # padding entries are sentinels
    rows = jnp.pad(rows, (0, pad), constant_values=out.shape[0])
    pos, w = jnp.pad(pos, (0, pad)), jnp.pad(w, (0, pad))
    chunks, d = rows.shape[0] // CHUNK, out.shape[1]
    final = chunks == 1
    # run number of each entry in its chunk: runs start where the row changes or a chunk starts
    by_chunk = rows.reshape(chunks, CHUNK)
    starts = jnp.concatenate([jnp.ones((chunks, 1), jnp.int32),
                              (by_chunk[:, 1:] != by_chunk[:, :-1]).astype(jnp.int32)], axis=1)
    seg = (jnp.cumsum(starts, axis=1) - 1).reshape(-1)
    entries = pl.BlockSpec((CHUNK,), lambda j, c: (c,))
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, c: (0, 0))
    out_shape = [jax.ShapeDtypeStruct(out.shape, out.dtype)]
    out_specs = [whole(out)]
    if not final:
        out_shape.append(jax.ShapeDtypeStruct((2 * chunks, d), jnp.float32))
        out_specs.append(pl.BlockSpec((2, bd), lambda j, c: (c, j)))
    result = pl.pallas_call(
        functools.partial(_segment_kernel, bd=bd, final=final),
        grid=(d // bd, chunks),
        in_specs=[entries, entries, entries, entries, whole(src), whole(out)],
        out_specs=out_specs, out_shape=out_shape, input_output_aliases={5: 0},
        compiler_params=_params(), interpret=interpret, name="embedding_bag_dtable",
    )(rows, seg, pos, w, src, out)
    if final:
        return result[0], None
    # the next level's entries: each chunk's first and last run, in chunk order (still sorted)
    return result[0], (by_chunk[:, jnp.array([0, CHUNK - 1])].reshape(-1), result[1])


def segment_levels(num_picks: int) -> int:
    """How many Pallas calls (levels) d_table makes for `num_picks = T * K` triples."""
    levels, m = 1, num_picks
    while m > CHUNK:
        levels, m = levels + 1, 2 * pl.cdiv(m, CHUNK)
    return levels


def d_table(table, indices, weights, d_out, *, interpret=False):
    """`d_table[r] = sum_{(t, k): indices[t, k] = r} weights[t, k] * d_out[t]`: `[N, d]` in
    table dtype, by levels of the chunked segmented reduction (module docstring)."""
    (n, d), bd = table.shape, pow2_block(table.shape[1], DTABLE_BD)
    rows, pos, w = sort_by_row(indices, weights, n)
    out, src = jnp.zeros((n, d), table.dtype), d_out
    while True:
        out, pieces = _segment_level(rows, pos, w, src, out, bd=bd, interpret=interpret)
        if pieces is None:
            return out
        rows, src = pieces
        pos = jnp.arange(rows.shape[0], dtype=jnp.int32)
        w = jnp.ones(rows.shape, jnp.float32)
