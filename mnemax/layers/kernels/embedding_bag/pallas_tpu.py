"""Mosaic (Pallas TPU) kernels of the embedding bag: forward, d_weights and d_table.

**Single rows of a tiled HBM array.** XLA stores a 2-D array in HBM in (8, 128) tiles of 32-bit
words; a bf16 array packs each pair of rows (2i, 2i + 1) into the low and high halves of one
word (`#tpu.tiled<(8,128)(2,1)>`). A DMA can start at any 32-bit row, so one row of an fp32
table is a legal DMA source, but one row of a bf16 table is half of every word of a row pair: the
first version sliced `table.at[pl.ds(row, 1)]` and Mosaic refused it ("Offsets along tiled
dimensions must be aligned to tiles"). Here a bf16 array is read and written through its uint32
view (`ref.bitcast(jnp.uint32)`, `[N, d] -> [N / 2, d]`: the same bytes, no copy, no padding):
a gather DMAs the word row `r // 2` (both rows of the pair, 2x the bytes of the row it needs)
and keeps the half `r % 2` (low = even row, as `pltpu.bitcast` defines it). The alternatives
cost more: a `[N, 1, d]` view is untiled in N but XLA relayouts the table into (2, 128) tiles
(a copy per call, 2x the HBM), and tile-aligned 16-row reads move 8x the bytes. A bf16 array
with an odd row count is padded by one row (a copy of the array) so that its word view exists.

Indices / weights arrive in SMEM blocks per grid step (the full index array of a real step,
T*K*4 bytes = 8 MiB, is larger than SMEM, so a whole-array scalar prefetch is not used); table
rows are gathered by DMA from HBM into VMEM, double-buffered across the tokens of a step.
d_table walks the (row, token, weight) triples sorted by row ("arbitrary" grid axis), gathers
each block's d_out rows with one semaphore per row (each triple waits only for its own row, so
the sum runs while later rows arrive), keeps the running row (row pair for bf16) sum in VMEM and
writes each finished row with an asynchronous DMA into an output aliased to zeros; a step waits
for its writes only at its end. Each step's work is `BE` triples whatever the row counts are (a
hot row costs what as many cold rows cost; a TensorCore runs the triple axis in order anyway),
and masked picks (weight 0: padding, other shards' picks under row sharding) carry the sentinel
row N, sort last, and are skipped: no gather, no add, and whole blocks of them cost one scalar
read.

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


def _packed(dtype) -> bool:
    """Whether rows of `dtype` share 32-bit words in pairs (bf16), see the module docstring."""
    return jnp.dtype(dtype).itemsize == 2


def _rows_operand(x: jax.Array, interpret: bool) -> jax.Array:
    """`x [R, d]` as an HBM operand that the kernel reads rows of: padded to an even R if it is
    packed (its word view needs whole pairs). In interpret mode a packed operand also passes an
    optimization barrier: XLA:CPU's constant folding of the interpreter's ref bitcast gives
    wrong values when `x` is a constant (measured: a closed-over bf16 table, max error 20)."""
    if not _packed(x.dtype):
        return x
    x = jnp.pad(x, ((0, x.shape[0] % 2), (0, 0)))
    return jax.lax.optimization_barrier(x) if interpret else x


def _words(ref, packed: bool):
    """The DMA-able row view of an HBM ref: its uint32 word rows if packed, else itself."""
    return ref.bitcast(jnp.uint32) if packed else ref


def _unpack(word_row: jax.Array, row, packed: bool) -> jax.Array:
    """Row `row` in fp32 from the word row holding it, `[1, bd]`: the low half of a bf16 word
    is the even row; a bf16 value is the top half of the fp32 with the same bits."""
    if not packed:
        return word_row.astype(jnp.float32)
    bits = jnp.where(row % 2 == 0, word_row << 16, (word_row >> 16) << 16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _from_words(words: jax.Array, dtype) -> jax.Array:
    """`[M, d]` uint32 -> `[2M, d]` of 16-bit `dtype`: row 2i is the low half of word row i
    (`pltpu.bitcast`'s definition of the bitcast)."""
    halves = jax.lax.bitcast_convert_type(words, dtype)  # [M, d, 2], low half first
    return jnp.swapaxes(halves, 1, 2).reshape(2 * words.shape[0], words.shape[1])


def _pack(even: jax.Array, odd: jax.Array) -> jax.Array:
    """Two fp32 rows rounded to bf16 (to nearest, ties to even) in one uint32 word row."""

    def top(x):  # the bf16 bits of x, in the high half of a word
        b = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16

    return top(odd) | (top(even) >> 16)


def _token_loop(idx_ref, words_hbm, buf, sem, bd, packed, consume):
    """For each token `t` of the step: wait its K gathered word rows (the next token's are
    already on their way into the other slot of `buf [2, K, bd]`), then `consume(t, rows)` with
    `rows(j)` the fp32 `[1, bd]` row of pick j."""
    k = buf.shape[1]
    bt = idx_ref.shape[1] // k
    d0 = pl.multiple_of(pl.program_id(1) * bd, bd)

    def copy(word, slot, j):
        return pltpu.make_async_copy(words_hbm.at[pl.ds(word, 1), pl.ds(d0, bd)],
                                     buf.at[slot, pl.ds(j, 1)], sem.at[slot])

    def start(t, slot):
        def one(j, carry):
            row = idx_ref[0, t * k + j]
            copy(row // 2 if packed else row, slot, j).start()
            return carry

        jax.lax.fori_loop(0, k, one, 0)

    start(0, 0)
    for t in range(bt):  # static: every slot and output row offset is a constant
        slot = t % 2
        if t + 1 < bt:
            start(t + 1, 1 - slot)

        def wait(j, carry, slot=slot):  # copies of equal size: any same-shaped one waits
            copy(0, slot, j).wait()
            return carry

        jax.lax.fori_loop(0, k, wait, 0)

        def rows(j, t=t, slot=slot):
            return _unpack(buf[slot, pl.ds(j, 1), :], idx_ref[0, t * k + j], packed)

        consume(t, rows)


def _fwd_kernel(idx_ref, w_ref, table_hbm, out_ref, buf, acc_ref, sem, *, bd, packed):
    k = buf.shape[1]

    def consume(t, rows):
        def add(j, acc):
            return acc + w_ref[0, t * k + j] * rows(j)

        acc_ref[pl.ds(t, 1), :] = jax.lax.fori_loop(0, k, add, jnp.zeros((1, bd), jnp.float32))

    _token_loop(idx_ref, _words(table_hbm, packed), buf, sem, bd, packed, consume)
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _blocks(indices, weights, bt):
    """Pads T to a multiple of bt; returns them as SMEM-ready `[T / bt, 1, bt * K]`."""
    pad = -indices.shape[0] % bt
    if pad:
        indices = jnp.pad(indices, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    t, k = indices.shape
    return indices.reshape(t // bt, 1, bt * k), weights.reshape(t // bt, 1, bt * k)


def _word_dtype(dtype):
    return jnp.uint32 if _packed(dtype) else dtype


def forward(table, indices, weights, *, out_dtype=None, interpret=False):
    """`[N, d], [T, K], [T, K] -> [T, d]` in `out_dtype` (default: the table's)."""
    d, bd = table.shape[1], pow2_block(table.shape[1], MAX_BD)
    t_in, k = indices.shape
    packed = _packed(table.dtype)
    idx3, w3 = _blocks(indices, weights.astype(jnp.float32), BT)
    smem = pl.BlockSpec((None, 1, BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, bd=bd, packed=packed),
        grid=(idx3.shape[0], d // bd),
        in_specs=[smem, smem, pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((BT, bd), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((idx3.shape[0] * BT, d), out_dtype or table.dtype),
        scratch_shapes=[pltpu.VMEM((2, k, bd), _word_dtype(table.dtype)),
                        pltpu.VMEM((BT, bd), jnp.float32), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret, name="embedding_bag_fwd",
    )(idx3, w3, _rows_operand(table, interpret))
    return out[:t_in]


def _dw_kernel(idx_ref, g_ref, table_hbm, dw_ref, buf, rows_ref, sem, *, bd, packed):
    @pl.when(pl.program_id(1) == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    g = g_ref[...].astype(jnp.float32)

    def consume(t, rows):
        def unpack(j, carry):
            rows_ref[pl.ds(j, 1), :] = rows(j)
            return carry

        jax.lax.fori_loop(0, rows_ref.shape[0], unpack, 0)
        # [1, bd] x [K, bd]^T -> [1, K]; HIGHEST: fp32 operands, no bf16 passes on the MXU
        dw_ref[t:t + 1, :] += jax.lax.dot_general(
            g[t:t + 1], rows_ref[...], (((1,), (1,)), ((), ())),
            precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    _token_loop(idx_ref, _words(table_hbm, packed), buf, sem, bd, packed, consume)


def d_weights(table, indices, d_out, *, interpret=False):
    d, bd = table.shape[1], pow2_block(table.shape[1], MAX_BD)
    t_in, k = indices.shape
    packed = _packed(table.dtype)
    idx3, _ = _blocks(indices, indices, BT)
    d_out = jnp.pad(d_out, ((0, idx3.shape[0] * BT - t_in), (0, 0)))
    smem = pl.BlockSpec((None, 1, BT * k), lambda i, j: (i, 0, 0), memory_space=pltpu.SMEM)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, bd=bd, packed=packed),
        grid=(idx3.shape[0], d // bd),  # d innermost: the dw block stays resident, accumulates
        in_specs=[smem, pl.BlockSpec((BT, bd), lambda i, j: (i, j)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((BT, k), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((idx3.shape[0] * BT, k), jnp.float32),
        scratch_shapes=[pltpu.VMEM((2, k, bd), _word_dtype(table.dtype)),
                        pltpu.VMEM((k, bd), jnp.float32), pltpu.SemaphoreType.DMA((2,))],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dw",
    )(idx3, d_out, _rows_operand(table, interpret))
    return dw[:t_in]


def _dtable_kernel(row_ref, tok_ref, w_ref, last_ref, g_hbm, zeros_hbm, out_hbm,
                   gbuf, acc_ref, obuf, gsem, osem, *, bd, n, packed_g, packed_out):
    del zeros_hbm  # aliased to out_hbm: rows that no triple touches stay zero
    be = gbuf.shape[0]
    d0 = pl.multiple_of(pl.program_id(0) * bd, bd)
    # interpret mode hands the packed output over as words already (see `d_table`)
    g_words = _words(g_hbm, packed_g)
    out_words = _words(out_hbm, packed_out and out_hbm.dtype != jnp.uint32)

    @pl.when(pl.program_id(1) == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def gather(j):
        tok = tok_ref[0, j]
        return pltpu.make_async_copy(
            g_words.at[pl.ds(tok // 2 if packed_g else tok, 1), pl.ds(d0, bd)],
            gbuf.at[pl.ds(j, 1)], gsem.at[j])

    def write(j, word):
        return pltpu.make_async_copy(obuf.at[pl.ds(j, 1)],
                                     out_words.at[pl.ds(word, 1), pl.ds(d0, bd)], osem.at[0])

    # Sentinel triples (row n: masked picks and padding) sort last: a block that starts with one
    # has nothing to add, and inside a block they neither gather nor write.
    @pl.when(row_ref[0, 0] < n)
    def _():
        def start(j, carry):
            @pl.when(row_ref[0, j] < n)
            def _():
                gather(j).start()

            return carry

        jax.lax.fori_loop(0, be, start, 0)

        def entry(j, writes):
            row = row_ref[0, j]
            live = row < n

            @pl.when(live)
            def _():
                gather(j).wait()
                half = row % 2 if packed_out else 0
                g = _unpack(gbuf[pl.ds(j, 1), :], tok_ref[0, j], packed_g)
                acc_ref[pl.ds(half, 1), :] += w_ref[0, j] * g

            done = live & (last_ref[0, j] != 0)

            @pl.when(done)  # the row's (row pair's) segment ends here: write it once, reset
            def _():
                if packed_out:
                    obuf[pl.ds(j, 1), :] = _pack(acc_ref[0:1, :], acc_ref[1:2, :])
                else:
                    obuf[pl.ds(j, 1), :] = acc_ref[0:1, :].astype(obuf.dtype)
                write(j, row // 2 if packed_out else row).start()
                acc_ref[...] = jnp.zeros_like(acc_ref)

            return writes + done.astype(jnp.int32)

        writes = jax.lax.fori_loop(0, be, entry, 0)

        def wait_write(i, carry):  # writes of equal size share a semaphore: wait as many
            write(0, 0).wait()
            return carry

        jax.lax.fori_loop(0, writes, wait_write, 0)


def d_table(table, indices, weights, d_out, *, interpret=False):
    return d_table_sorted(table, *sort_by_row(indices, weights, table.shape[0]), d_out,
                          interpret=interpret)


def d_table_sorted(table, srows, stoks, sw, d_out, *, interpret=False):
    """d_table from the `sort_by_row` triples with sentinel row N for masked picks (the kernel
    without XLA's sort)."""
    (n, d), bd = table.shape, pow2_block(table.shape[1], MAX_BD)
    packed_out, packed_g = _packed(table.dtype), _packed(d_out.dtype)
    pad = -srows.shape[0] % BE  # padding triples are sentinels too
    srows = jnp.pad(srows, (0, pad), constant_values=n)
    stoks, sw = jnp.pad(stoks, (0, pad)), jnp.pad(sw, (0, pad))
    seg = srows // 2 if packed_out else srows  # bf16 rows are written in word-sharing pairs
    # a real segment's last triple: the next triple is another row (pair) or a sentinel (for an
    # odd n, row n - 1 and the sentinel n share a word pair)
    nxt_seg, nxt_real = jnp.append(seg[1:], -1), jnp.append(srows[1:] < n, False)
    last = ((seg != nxt_seg) | ~nxt_real).astype(jnp.int32)
    srows, stoks, sw, last = (a.reshape(-1, 1, BE) for a in (srows, stoks, sw, last))
    # Compiled, the kernel writes a bf16 output through its word view (no copy). Interpret mode
    # cannot write through a ref bitcast, so there the output is declared as its words and
    # unpacked by `_from_words`, the same map `ref.bitcast` stands for.
    n_out = n + n % 2 if packed_out else n
    out_dtype = jnp.uint32 if packed_out and interpret else table.dtype
    if out_dtype == jnp.uint32:
        n_out //= 2
    smem = pl.BlockSpec((None, 1, BE), lambda j, e: (e, 0, 0), memory_space=pltpu.SMEM)
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_dtable_kernel, bd=bd, n=n, packed_g=packed_g,
                          packed_out=packed_out),
        grid=(d // bd, srows.shape[0]),
        in_specs=[smem, smem, smem, smem, hbm, hbm],
        out_specs=hbm,
        out_shape=jax.ShapeDtypeStruct((n_out, d), out_dtype),
        scratch_shapes=[pltpu.VMEM((BE, bd), _word_dtype(d_out.dtype)),
                        pltpu.VMEM((2, bd), jnp.float32),
                        pltpu.VMEM((BE, bd), _word_dtype(table.dtype)),
                        pltpu.SemaphoreType.DMA((BE,)), pltpu.SemaphoreType.DMA((1,))],
        input_output_aliases={5: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret, name="embedding_bag_dtable",
    )(srows, stoks, sw, last, _rows_operand(d_out, interpret),
      jnp.zeros((n_out, d), out_dtype))
    return (_from_words(out, table.dtype) if out_dtype == jnp.uint32 else out)[:n]
