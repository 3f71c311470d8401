"""The three Mosaic (Pallas TPU) kernels of block-sparse attention on heads-major operands; the
op around them (layouts, block-list codes, SMEM-sized calls, `custom_vjp`) is `pallas_tpu`.

**Query groups.** Queries are cut into groups of `query_block` tokens (Q, default the key
block B; Q divides B), one list per group: q-side tiles `[Q, d]`, k-side tiles `[B, d]`.

**Orientation.** Scores are computed transposed, `s^T = k q^T` `[B, Q]`, so that everything per
query (running max and sum, log-sum-exp, `delta`, the slot-mask bits) is a lane row `[1, Q]`:
the forward accumulates `o^T += v^T p^T` (a transposed-lhs matmul of v `[B, d]`), dq
`dq^T += k^T ds^T`, dk/dv `dk += ds^T q`, `dv += p^T dO`; the forward's and dq's `[d, Q]`
accumulators are transposed once, at a group's last slot, into `[Q, d]` output tiles. Online
softmax as FlashAttention-2 (Dao, 2023): running max and sum in fp32, the output rescaled as
the max grows; the backward recomputes `p` from the forward's log-sum-exp.

**Per-query rows** (slot-mask words, log-sum-exp, `delta`) are `[.., nq8, Q]` arrays, one row
per query group (nq8: the groups padded to a multiple of 8), read and written in `[8, Q]` tiles
(8 sublanes, Q the whole lane axis: legal for any Q) of which a step uses row `i % 8`. So Q and
B need only be multiples of 16 rows (bf16 sublane tiling): NSA's 16-token groups in 64-token
blocks compile, as do MoBA's 512-token blocks.

**Per step.**
- forward, grid (batch, heads, query groups, slots), slots "arbitrary": the k/v index maps read
  the step's code from SMEM (scalar prefetch) and fetch key block `max(c, -1 - c)`; if live
  (`c >= 0`), `s^T`, the visibility mask (causal + window from the block offsets, bit `slot`
  of each query's slot-mask word), the running max/sum and `o^T` updates in fp32 scratch; at
  the last slot `o = (o^T / sum)^T` and `lse = max + log(sum)` (0 for a query that read
  nothing); query groups "arbitrary" too, as 8 consecutive groups write one `[8, Q]` lse tile.
- dq, the same grid: if live, `p^T = exp(s^T - lse)` masked, `dp^T = v dO^T`,
  `ds^T = p^T (dp^T - delta)` with `delta = rowsum(dO * o)`, `dq^T += k^T ds^T`.
- dk/dv, grid (batch, kv heads, triples): a TPU output block may be revisited only on
  consecutive grid steps, so each kv head's (query group, slot, key block) triples are sorted
  by key block outside the kernel (`sorted_triples`, the `embedding_bag` d_table scheme):
  skipped triples sort last and only re-store the last block, and one no-op triple per key
  block makes every output block visited (zero where no query reads it). A step zeroes the fp32
  accumulators when its key row differs from the previous step's, adds `p^T dO` and `ds^T q` if
  live, and stores them into the resident dk/dv block. GQA: a kv head's triples are those of
  its group's q heads, so its blocks sum over them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

# Finite "minus infinity": a step where a query sees nothing keeps max = _NEG and
# exp(_NEG - _NEG) = 1 is masked to 0 explicitly; -inf would give exp(-inf + inf) = NaN.
_NEG = -1e30
_NT = (((1,), (1,)), ((), ()))  # a [m, d] x b [n, d] -> [m, n]
_TN = (((0,), (0,)), ((), ()))  # a [k, m] x b [k, n] -> [m, n]
_NN = (((1,), (0,)), ((), ()))
ROW_TILE = 8  # query groups per tile of the per-query rows (sublanes)


@dataclasses.dataclass(frozen=True)
class Statics:
    """What the kernels are specialised on (hashable: a `custom_vjp` non-diff argument)."""

    block_size: int  # tokens per key block
    window: int | None  # keys a query reads back, itself included (None: all causal keys)
    scale: float  # score scale, d^-1/2 by default
    interpret: bool  # run the kernels in Pallas interpret mode (CPU tests)
    query_block: int | None = None  # tokens per query group (one list each); None: block_size

    @property
    def q_rows(self) -> int:
        return self.query_block or self.block_size


def _dot(a, b, dims):
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.float32)


def _visible(q_block, k_block, slot, bits, shape, st: Statics):
    """`[block_k, block_q]` bool: key row r of block `k_block` is visible to query column c of
    query group `q_block` through `slot` (bits `[1, block_q]`: the queries' slot-mask words)."""
    lag = (q_block * st.q_rows - k_block * st.block_size
           + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
           - jax.lax.broadcasted_iota(jnp.int32, shape, 0))  # t - s
    vis = (lag >= 0) & ((jnp.right_shift(bits, slot) & 1) != 0)
    if st.window is not None:
        vis &= lag < st.window
    return vis


def row_groups(nq: int) -> int:
    """Rows of a per-query row array: the nq query groups padded to whole `ROW_TILE`s."""
    return -(-nq // ROW_TILE) * ROW_TILE


def _row(ref, i):
    """Query group i's `[1, Q]` row of an `[8, Q]` tile of per-query rows."""
    return ref[pl.ds(jax.lax.rem(i, ROW_TILE), 1), :]


def _fwd_kernel(codes_ref, q_ref, k_ref, v_ref, bits_ref, out_ref, lse_ref, m_ref, l_ref,
                acc_ref, *, st: Statics, heads: int, nq: int, slots: int):
    b, h, i, slot = (pl.program_id(a) for a in range(4))
    code = codes_ref[((b * heads + h) * nq + i) * slots + slot]

    @pl.when(slot == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(code >= 0)
    def _():
        s = _dot(k_ref[...], q_ref[...], _NT) * st.scale  # [bk, bq]
        vis = _visible(i, code, slot, _row(bits_ref, i), s.shape, st)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(jnp.where(vis, s, _NEG), axis=0, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=0, keepdims=True)
        acc_ref[...] = alpha * acc_ref[...] + _dot(v_ref[...], p.astype(v_ref.dtype), _TN)
        m_ref[...] = m_new

    @pl.when(slot == slots - 1)
    def _():
        total = l_ref[...]
        read = total > 0
        out_ref[...] = (acc_ref[...] / jnp.where(read, total, 1.0)).T.astype(out_ref.dtype)
        lse_ref[pl.ds(jax.lax.rem(i, ROW_TILE), 1), :] = jnp.where(
            read, m_ref[...] + jnp.log(jnp.where(read, total, 1.0)), 0.0)


def _codes_map(heads, nq, slots, side="q", group=1):
    """Index map of the (batch, head, query group, slot) grid: the q-side block ("q"), the
    `[8, Q]` tile of per-query rows ("row") or the k/v block `[bs, d]` ("kv") that the step's
    code names."""
    def index(b, h, i, slot, codes):
        if side == "q":
            return b, h, i, 0
        if side == "row":
            return b, h, i // ROW_TILE, 0
        c = codes[((b * heads + h) * nq + i) * slots + slot]
        return b, h // group, jnp.maximum(c, -1 - c), 0

    return index


def forward(qh: jax.Array, kh: jax.Array, vh: jax.Array, codes: jax.Array, bits: jax.Array,
            st: Statics) -> tuple[jax.Array, jax.Array]:
    """The forward kernel: heads-major qh `[B, H, Tp, d]`, kh, vh `[B, KH, Tp, d]` (Tp = nq *
    query_block, a multiple of block_size), codes `[B, H, nq, L]` (`slot_codes`), bits
    `[B, H, nq8, Q]` (`slot_bits`, nq8 = `row_groups(nq)`) -> out `[B, H, Tp, d]` in q's dtype,
    lse `[B, H, nq8, Q]` fp32 (0 for a query that reads nothing)."""
    batch, heads, tp, d = qh.shape
    group = heads // kh.shape[1]
    bs, bq, (_, _, nq, slots) = st.block_size, st.q_rows, codes.shape
    qside = pl.BlockSpec((None, None, bq, d), _codes_map(heads, nq, slots))
    kvside = pl.BlockSpec((None, None, bs, d), _codes_map(heads, nq, slots, "kv", group))
    row = pl.BlockSpec((None, None, ROW_TILE, bq), _codes_map(heads, nq, slots, "row"))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st, heads=heads, nq=nq, slots=slots),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, nq, slots),
            in_specs=[qside, kvside, kvside, row],
            out_specs=[qside, row],
            scratch_shapes=[pltpu.VMEM((1, bq), jnp.float32), pltpu.VMEM((1, bq), jnp.float32),
                            pltpu.VMEM((d, bq), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, tp, d), qh.dtype),
                   jax.ShapeDtypeStruct(bits.shape, jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=st.interpret, name="block_sparse_attention_fwd",
    )(codes.reshape(-1), qh, kh, vh, bits)


def _dq_kernel(codes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bits_ref, dq_ref,
               acc_ref, *, st: Statics, heads: int, nq: int, slots: int):
    b, h, i, slot = (pl.program_id(a) for a in range(4))
    code = codes_ref[((b * heads + h) * nq + i) * slots + slot]

    @pl.when(slot == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(code >= 0)
    def _():
        k = k_ref[...]
        s = _dot(k, q_ref[...], _NT) * st.scale
        vis = _visible(i, code, slot, _row(bits_ref, i), s.shape, st)
        p = jnp.where(vis, jnp.exp(s - _row(lse_ref, i)), 0.0)
        dp = _dot(v_ref[...], do_ref[...], _NT)
        ds = p * (dp - _row(delta_ref, i))
        acc_ref[...] += _dot(k, ds.astype(k.dtype), _TN)  # [d, bq]

    @pl.when(slot == slots - 1)
    def _():
        dq_ref[...] = (acc_ref[...] * st.scale).T.astype(dq_ref.dtype)


def d_query(qh: jax.Array, kh: jax.Array, vh: jax.Array, doh: jax.Array, lse: jax.Array,
            delta: jax.Array, bits: jax.Array, codes: jax.Array, st: Statics) -> jax.Array:
    """The dq kernel: heads-major qh, doh `[B, H, Tp, d]`, kh, vh `[B, KH, Tp, d]`, per-query
    rows lse, delta (`rowsum(dO * o)`, fp32) and bits `[B, H, nq8, Q]` -> dq `[B, H, Tp, d]`."""
    batch, heads, tp, d = qh.shape
    group = heads // kh.shape[1]
    bs, bq, (_, _, nq, slots) = st.block_size, st.q_rows, codes.shape
    qside = pl.BlockSpec((None, None, bq, d), _codes_map(heads, nq, slots))
    kvside = pl.BlockSpec((None, None, bs, d), _codes_map(heads, nq, slots, "kv", group))
    row = pl.BlockSpec((None, None, ROW_TILE, bq), _codes_map(heads, nq, slots, "row"))
    return pl.pallas_call(
        functools.partial(_dq_kernel, st=st, heads=heads, nq=nq, slots=slots),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, nq, slots),
            in_specs=[qside, kvside, kvside, qside, row, row, row],
            out_specs=qside,
            scratch_shapes=[pltpu.VMEM((d, bq), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((batch, heads, tp, d), qh.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=st.interpret, name="block_sparse_attention_dq",
    )(codes.reshape(-1), qh, kh, vh, doh, lse, delta, bits)


def sorted_triples(codes: jax.Array, kv_heads: int,
                   num_key_blocks: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The dk/dv kernel's walk: per (batch, kv head), the (query row, key row, slot) of every
    (q head of its group, query group, slot) plus one no-op per key block, stably sorted by key
    block.

    codes `[B, H, nq, L]` (see the module docstring), nk = `num_key_blocks` (default nq). Query
    row `n * nq + i`, key row `(n // group) * nk + j`. A skipped triple sorts last (key block
    nk) and then names the kv head's last key row, revisiting the block just before it; it and
    the no-ops have slot -1. Returns three `[B, kv_heads, E]` int32, `E = group * nq * L + nk`.
    """
    batch, heads, nq, slots = codes.shape
    nk = num_key_blocks or nq
    group = heads // kv_heads
    codes = codes.reshape(batch, kv_heads, group * nq * slots)
    live = codes >= 0
    qrow = jnp.arange(heads * nq, dtype=jnp.int32).reshape(kv_heads, group * nq)
    qrow = jnp.broadcast_to(jnp.repeat(qrow, slots, axis=1), codes.shape)
    slot = jnp.where(live, jnp.arange(codes.shape[2], dtype=jnp.int32) % slots, -1)
    noops = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (batch, kv_heads, nk))
    key = jnp.concatenate([jnp.where(live, codes, nk), noops], axis=2)
    qrow = jnp.concatenate([qrow, jnp.zeros_like(noops)], axis=2)
    slot = jnp.concatenate([slot, jnp.full_like(noops, -1)], axis=2)
    key, qrow, slot = jax.lax.sort((key, qrow, slot), dimension=2, num_keys=1, is_stable=True)
    krow = jnp.arange(kv_heads, dtype=jnp.int32)[:, None] * nk + jnp.minimum(key, nk - 1)
    return qrow, krow, slot


def _dkv_kernel(qrow_ref, krow_ref, slot_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                bits_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, st: Statics, nq: int, nk: int,
                kv_heads: int, steps: int):
    b, g, e = (pl.program_id(a) for a in range(3))
    at = (b * kv_heads + g) * steps + e
    krow, slot, i = krow_ref[at], slot_ref[at], qrow_ref[at] % nq

    @pl.when((e == 0) | (krow != krow_ref[jnp.maximum(at - 1, 0)]))
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(slot >= 0)
    def _():
        q, do = q_ref[...], do_ref[...]
        s = _dot(k_ref[...], q, _NT) * st.scale  # [bk, bq]
        vis = _visible(i, krow % nk, slot, _row(bits_ref, i), s.shape, st)
        p = jnp.where(vis, jnp.exp(s - _row(lse_ref, i)), 0.0)
        dv_acc[...] += _dot(p.astype(do.dtype), do, _NN)
        ds = p * (_dot(v_ref[...], do, _NT) - _row(delta_ref, i))
        dk_acc[...] += _dot(ds.astype(q.dtype), q, _NN)

    dk_ref[...] = (dk_acc[...] * st.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def d_key_value(qh: jax.Array, kh: jax.Array, vh: jax.Array, doh: jax.Array, lse: jax.Array,
                delta: jax.Array, bits: jax.Array, codes: jax.Array, st: Statics,
                out_dtype=None) -> tuple[jax.Array, jax.Array]:
    """The dk/dv kernel over `sorted_triples(codes)`, operands as `d_query`'s -> dk, dv
    `[B, KH, Tp, d]` in `out_dtype` (default k's)."""
    batch, _, tp, d = qh.shape
    kv_heads, bs, bq, nq = kh.shape[1], st.block_size, st.q_rows, codes.shape[2]
    nk = tp // bs
    qrow, krow, slot = sorted_triples(codes, kv_heads, nk)
    steps = qrow.shape[2]

    def flat(x):  # [B, n, tp, w] -> [B, n * tp, w]: a block row index names (head, block)
        return x.reshape(batch, -1, x.shape[-1])

    def at(b, g, e):
        return (b * kv_heads + g) * steps + e

    def row_tile(qrow):  # query row n * nq + i -> tile (n, i // 8) of the [B, H * nq8, Q] rows
        return qrow // nq * (row_groups(nq) // ROW_TILE) + qrow % nq // ROW_TILE

    qside = pl.BlockSpec((None, bq, d), lambda b, g, e, qr, kr, sl: (b, qr[at(b, g, e)], 0))
    kside = pl.BlockSpec((None, bs, d), lambda b, g, e, qr, kr, sl: (b, kr[at(b, g, e)], 0))
    row = pl.BlockSpec((None, ROW_TILE, bq),
                       lambda b, g, e, qr, kr, sl: (b, row_tile(qr[at(b, g, e)]), 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st, nq=nq, nk=nk, kv_heads=kv_heads, steps=steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(batch, kv_heads, steps),
            in_specs=[qside, kside, kside, qside, row, row, row],
            out_specs=[kside, kside],
            scratch_shapes=[pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads * tp, d), out_dtype or kh.dtype)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=st.interpret, name="block_sparse_attention_dkv",
    )(qrow.reshape(-1), krow.reshape(-1), slot.reshape(-1), flat(qh), flat(kh), flat(vh),
      flat(doh), flat(lse), flat(delta), flat(bits))
    return dk.reshape(kh.shape), dv.reshape(vh.shape)
