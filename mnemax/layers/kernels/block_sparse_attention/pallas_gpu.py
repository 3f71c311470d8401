"""Pallas GPU (Triton) kernels of block-sparse attention: flash attention (Dao 2023,
"FlashAttention-2") whose key loop walks a query group's list of key blocks instead of the whole
sequence.

Work is cut in tiles: key tiles of `min(block_size, TILE)` rows (`TILE` = 64; MoBA's 512-token
blocks are 8 tiles), query tiles of `min(query_block, TILE)` rows, where a query group of
`query_block` tokens shares one list (NSA: 16-token groups in 64-token key blocks, so a group
reads little more than its tokens' own choices, as the paper's kernel, Sec. 3.4).
- Forward, grid (query tiles, batch, heads): a program keeps its `[q_tile, d]` queries on chip
  and, for each listed slot l of its query group and each key tile of that block, reads the
  keys of block `block_indices[b, h, i, l]` of its kv head by that index, masks them (slot mask
  column l, causality, window) and folds them into the online softmax (fp32, base 2). It writes
  the output and the log-sum-exp of the scaled scores (natural log; 0 for a query that sees no
  key, whose output is 0).
- dq, grid (query tiles, batch, heads): the same walk, `dq += dS K` with
  `dS = P * (dO V^T - delta)`, `P = exp(S - lse)`, `delta = rowsum(dO * O)`.
- dk / dv, grid (key tiles, batch, kv heads): a program owns one key tile of one kv head and
  walks the (q head of its group, query group, slot) entries that list its block, each in
  query steps (`dkdv_query_tile`, at most the group), in a fixed order: the inverse lists are
  built outside the kernel with jnp (a stable sort of the entries by key block, CSR offsets), so
  no atomics are needed and the gradients are deterministic.

GQA packing (`shared_group_lists`, NSA Sec. 3.4): when the q heads of a GQA group share their
lists, q is laid out as `[batch, T * group, kv_heads, d]` (a token's heads on consecutive rows)
and the kernels run on kv heads with `rows` = group q rows per token: one program loads each
listed key block once for all the group's heads, and query tiles are `query_block * group` rows
(NSA: 16 tokens x 4 heads = 64, where one head's 16 rows would leave Hopper's MMA mostly idle).

Unused slots (-1) and (query, key) tile pairs wholly in the future or outside the window are
skipped (`lax.cond`; the dk / dv lists leave out whole blocks of that kind). Matmul operands are
in the input dtype (bf16 in training: the tensor cores), accumulated in fp32. A ragged last
block is zero-padded, its rows masked through the slot mask (padding reads nothing) and
causality (no real query reads a padded key). `block_size`, `query_block` and `d` must be
powers of two >= 16 (Triton's `dot` wants M, N, K >= 16); `op.py` sends other shapes to the XLA
path. Registers on sm_90a:
`tests/kernels/test_gpu_compile.py`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mnemax.layers.kernels.block_sparse_attention.gpu_layout import (
    key_block_lists,
    overlaps,
    pack_group_rows,
    unpack_group_rows,
)
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.tiling import is_pow2

LOG2E = math.log2(math.e)
TILE = 64  # query and key rows per tile: blocks larger than this are walked in tiles
NUM_STAGES = 2


def supported(block_size: int, d: int, query_block: int | None = None) -> bool:
    """Whether the kernels take these sizes (Triton's `dot` wants powers of two >= 16)."""
    return is_pow2(block_size, 16) and is_pow2(d, 16) and is_pow2(query_block or block_size, 16)


def dkdv_query_tile(tile: int, d: int) -> int:
    """Query rows per step of the dk / dv kernel: half a tile from d = 128 on. Its program
    holds two fp32 `[tile, d]` accumulators besides the step's scores; with 64-row query steps
    at d = 128 ptxas used all 255 registers (no spills yet), with 32 rows 207 (sm_90a, block
    512)."""
    return max(16, tile // 2) if d >= 128 else tile


def num_warps(tile: int, d: int) -> int:
    """Warps per program: 4 up to a 64 x 64 tile, 8 above (as JAX's flash kernel)."""
    return 4 if tile * d <= 64 * 64 else 8


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """`a @ b` (either transposed), operands as given, accumulated in fp32."""
    contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _visible(q_pos, k_pos, mask_row, window: int | None):
    """`[Tq, Tk]` bool: query q_pos[r] sees key k_pos[c] (slot mask row, causal, window)."""
    vis = (mask_row != 0)[:, None] & (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        vis &= k_pos[None, :] > q_pos[:, None] - window
    return vis


def _key_tiles(idx_ref, q_first, *, block_size, q_tile, k_tile, window, body, init):
    """Folds `body(slot, k_first, carry)` over the key tiles of the listed blocks that queries
    `[q_first, q_first + q_tile)` may see, in (slot, tile) order; other tiles are skipped."""
    per_block = block_size // k_tile

    def step(t, carry):
        slot, c = lax.div(t, per_block), lax.rem(t, per_block)  # t >= 0: C division
        j = idx_ref[slot]
        k_first = j * block_size + c * k_tile
        reads = (j >= 0) & overlaps(k_first, k_tile, q_first, q_tile, window)
        return lax.cond(reads, lambda x: body(slot, k_first, x), lambda x: x, carry)

    return lax.fori_loop(0, idx_ref.shape[0] * per_block, step, init)


def _forward_kernel(idx_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_size,
                    q_tile, k_tile, rows, window, scale):
    q_first = pl.program_id(0) * q_tile
    q = q_ref[...]
    q_pos = (q_first + jnp.arange(q_tile)) // rows

    def update(slot, k_first, carry):
        o, m, total = carry
        rows = pl.ds(k_first, k_tile)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        s = jnp.where(_visible(q_pos, k_first + jnp.arange(k_tile), mask_ref[slot, :], window),
                      s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, alpha * total + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((q_tile,), -jnp.inf, jnp.float32),
            jnp.zeros((q_tile,), jnp.float32))
    o, m, total = _key_tiles(idx_ref, q_first // rows, block_size=block_size,
                             q_tile=q_tile // rows, k_tile=k_tile, window=window, body=update,
                             init=init)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    o_ref[...] = (o / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m / LOG2E + jnp.log(total), 0.0)


def _dq_kernel(idx_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               block_size, q_tile, k_tile, rows, window, scale):
    q_first = pl.program_id(0) * q_tile
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * LOG2E, delta_ref[...]
    q_pos = (q_first + jnp.arange(q_tile)) // rows

    def update(slot, k_first, dq):
        rows = pl.ds(k_first, k_tile)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        vis = _visible(q_pos, k_first + jnp.arange(k_tile), mask_ref[slot, :], window)
        p = jnp.where(vis, jnp.exp2(s - lse2[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _key_tiles(idx_ref, q_first // rows, block_size=block_size, q_tile=q_tile // rows,
                    k_tile=k_tile, window=window, body=update,
                    init=jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(offsets_ref, entries_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, block_size, query_block, k_tile, q_step, rows,
                 num_q_blocks, num_k_blocks, slots, window, scale):
    t, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    per_block = block_size // k_tile
    k_first = t * k_tile
    cell = (b * pl.num_programs(2) + g) * num_k_blocks + lax.div(t, per_block)
    k, v = k_ref[...], v_ref[...]
    k_pos = k_first + jnp.arange(k_tile)

    def query_tile(h, slot, q_first, carry):
        dk, dv = carry
        span = pl.ds(q_first, q_step)
        q, do = q_ref[span, h, :], do_ref[span, h, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        vis = _visible((q_first + jnp.arange(q_step)) // rows, k_pos, mask_ref[h, slot, span],
                       window)
        p = jnp.where(vis, jnp.exp2(s - lse_ref[h, span][:, None] * LOG2E), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[h, span][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    def entry(e, carry):
        code = entries_ref[e]  # (head in group, query group, slot)
        slot, i = lax.rem(code, slots), lax.rem(lax.div(code, slots), num_q_blocks)
        h = lax.div(code, slots * num_q_blocks)

        def sub(r, carry):
            q_first = (i * query_block) * rows + r * q_step
            return lax.cond(overlaps(k_first, k_tile, q_first // rows, q_step // rows, window),
                            lambda x: query_tile(h, slot, q_first, x), lambda x: x, carry)

        return lax.fori_loop(0, query_block * rows // q_step, sub, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(offsets_ref[cell], offsets_ref[cell + 1], entry, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad_time(x: jax.Array, padded: int, axis: int = 1) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - x.shape[axis])
    return jnp.pad(x, pad) if padded != x.shape[axis] else x


def _slot_rows(slot_mask: jax.Array, padded: int) -> jax.Array:
    """`[batch, heads, T, L]` bool -> `[batch, heads, L, padded]` int8: a slot's mask for a
    query group is one contiguous row; padding reads nothing."""
    return _pad_time(slot_mask, padded, axis=2).swapaxes(2, 3).astype(jnp.int8)


def _params(tile: int, d: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps(tile, d), num_stages=NUM_STAGES)


def _padded_lists(block_indices: jax.Array, groups: int) -> jax.Array:
    """The lists of the query groups in the padded time axis (padding groups list nothing)."""
    extra = groups - block_indices.shape[2]
    return jnp.pad(block_indices, [(0, 0), (0, 0), (0, extra), (0, 0)], constant_values=-1)


def _query_specs(query_rows: int, q_tile: int, slots: int, d: int):
    """Block specs of the (query tiles, batch, heads) grid: the tile's group's list (a group is
    `query_rows` q rows), its slot mask rows, its `[q_tile, d]` rows and its per-row
    statistics."""
    per_group = query_rows // q_tile
    return (pl.BlockSpec((None, None, None, slots), lambda t, b, h: (b, h, t // per_group, 0)),
            pl.BlockSpec((None, None, slots, q_tile), lambda t, b, h: (b, h, 0, t)),
            pl.BlockSpec((None, q_tile, None, d), lambda t, b, h: (b, t, h, 0)),
            pl.BlockSpec((None, None, q_tile), lambda t, b, h: (b, h, t)))


def forward(q, k, v, block_indices, slot_mask, *, block_size, query_block, q_tile, k_tile,
            rows, window, scale, interpret):
    """`(out [batch, T * rows, heads, d] in q's dtype, lse [batch, heads, n * B * rows] fp32)`.
    q holds `rows` consecutive rows per token (`pack_group_rows`), k and v one."""
    batch, q_len, heads, d = q.shape
    seq_len, group = k.shape[1], heads // k.shape[2]
    slots = block_indices.shape[3]
    padded = num_blocks(seq_len, block_size) * block_size
    q = _pad_time(q, padded * rows)
    k, v = (_pad_time(x, padded) for x in (k, v))
    lists, mask_rows, q_rows, stat_rows = _query_specs(query_block * rows, q_tile, slots, d)
    kv_whole = pl.BlockSpec((None, padded, None, d), lambda t, b, h: (b, 0, h // group, 0))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_size=block_size, q_tile=q_tile, k_tile=k_tile,
                          rows=rows, window=window, scale=scale),
        grid=(padded * rows // q_tile, batch, heads),
        in_specs=[lists, mask_rows, q_rows, kv_whole, kv_whole],
        out_specs=[q_rows, stat_rows],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded * rows), jnp.float32)],
        compiler_params=_params(q_tile, d), interpret=interpret,
        name="block_sparse_attention_fwd",
    )(_padded_lists(block_indices, padded // query_block), _slot_rows(slot_mask, padded * rows),
      q, k, v)
    return out[:, :q_len], lse


def backward(q, k, v, block_indices, slot_mask, out, lse, d_out, *, block_size, query_block,
             q_tile, k_tile, rows, window, scale, interpret):
    """`(dq, dk, dv)` in the dtypes of q, k, v, from the forward's `out` and `lse` (q, out,
    d_out with `rows` rows per token, as `forward`)."""
    batch, q_len, heads, d = q.shape
    seq_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    slots = block_indices.shape[3]
    n = num_blocks(seq_len, block_size)
    padded = n * block_size
    block_indices = _padded_lists(block_indices, padded // query_block)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    q, d_out = (_pad_time(x, padded * rows) for x in (q, d_out))
    k, v = (_pad_time(x, padded) for x in (k, v))
    delta = _pad_time(delta, padded * rows, axis=2)
    mask = _slot_rows(slot_mask, padded * rows)
    static = dict(block_size=block_size, rows=rows, window=window, scale=scale)

    lists, mask_rows, q_rows, stat_rows = _query_specs(query_block * rows, q_tile, slots, d)
    kv_whole = pl.BlockSpec((None, padded, None, d), lambda t, b, h: (b, 0, h // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, q_tile=q_tile, k_tile=k_tile, **static),
        grid=(padded * rows // q_tile, batch, heads),
        in_specs=[lists, mask_rows, q_rows, kv_whole, kv_whole, q_rows, stat_rows, stat_rows],
        out_specs=q_rows,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(q_tile, d), interpret=interpret,
        name="block_sparse_attention_dq",
    )(block_indices, mask, q, k, v, d_out, lse, delta)

    offsets, entries = key_block_lists(block_indices, kv_heads, block_size, window, query_block,
                                       n)
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, b, g: (0,) * x.ndim)
    k_rows = pl.BlockSpec((None, k_tile, None, d), lambda t, b, g: (b, t, g, 0))
    group_rows = pl.BlockSpec((None, padded * rows, group, d), lambda t, b, g: (b, 0, g, 0))
    group_stats = pl.BlockSpec((None, group, padded * rows), lambda t, b, g: (b, g, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, query_block=query_block, k_tile=k_tile,
                          q_step=min(dkdv_query_tile(k_tile, d), query_block * rows),
                          num_q_blocks=padded // query_block, num_k_blocks=n, slots=slots,
                          **static),
        grid=(padded // k_tile, batch, kv_heads),
        in_specs=[whole(offsets), whole(entries),
                  pl.BlockSpec((None, group, slots, padded * rows),
                               lambda t, b, g: (b, g, 0, 0)),
                  group_rows, k_rows, k_rows, group_rows, group_stats, group_stats],
        out_specs=[k_rows, k_rows],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(k_tile, d), interpret=interpret,
        name="block_sparse_attention_dkdv",
    )(offsets, entries, mask, q, k, v, d_out, lse, delta)
    return dq[:, :q_len], dk[:, :seq_len], dv[:, :seq_len]


@functools.cache
def _differentiable(block_size: int, query_block: int, q_tile: int, k_tile: int, rows: int,
                    window: int | None, scale: float, interpret: bool):
    static = dict(block_size=block_size, query_block=query_block, q_tile=q_tile, k_tile=k_tile,
                  rows=rows, window=window, scale=scale, interpret=interpret)

    @jax.custom_vjp
    def op(q, k, v, block_indices, slot_mask):
        return forward(q, k, v, block_indices, slot_mask, **static)[0]

    def fwd(q, k, v, block_indices, slot_mask):
        out, lse = forward(q, k, v, block_indices, slot_mask, **static)
        return out, (q, k, v, block_indices, slot_mask, out, lse)

    def bwd(res, d_out):
        return (*backward(*res, d_out, **static), None, None)

    op.defvjp(fwd, bwd)
    return op


def packed_rows(heads: int, kv_heads: int, q_tile: int, k_tile: int, d: int) -> int:
    """q rows per token when the q heads of a GQA group share their lists: the group, when it
    is a power of two that whole query tiles and dk / dv query steps hold; else 1."""
    group = heads // kv_heads
    fits = group <= min(q_tile, dkdv_query_tile(k_tile, d))
    return group if group > 1 and is_pow2(group, 1) and fits else 1


def attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
              slot_mask: jax.Array, *, block_size: int, window: int | None, scale: float,
              interpret: bool = False, tile: int | None = None,
              query_block: int | None = None, shared_group_lists: bool = False) -> jax.Array:
    """Block-sparse attention by the Triton kernels, differentiable w.r.t. q, k, v.

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]` (one dtype), block_indices
    `[batch, heads, ceil(T / query_block), L]` int32 (-1 unused; query_block None =
    block_size), slot_mask `[batch, heads, T, L]` bool -> `[batch, T, heads, d]` in q's dtype.
    Needs `supported(block_size, d, query_block)`. `tile`: most rows of a query or key tile, a
    power of two >= 16 (default `TILE`); a key tile is `min(tile, block_size)` rows.

    `shared_group_lists`: the q heads of each GQA group list the same blocks (NSA's selection,
    Eq. 10; the slot masks may differ); only the group's first head's lists are read. The
    kernels then take the group's heads as rows of one query tile (`packed_rows`; NSA Sec. 3.4's
    group-centric loading): a program loads each listed key block once for the whole group, and
    16 queries x 4 heads fill a 64-row tile. Otherwise a query tile is `min(tile, query_block)`
    rows of one head.
    """
    query_block = query_block or block_size
    tile = TILE if tile is None else tile
    if not (is_pow2(tile, 16) and is_pow2(query_block, 16) and block_size % query_block == 0):
        raise ValueError(f"tile={tile} and query_block={query_block} must be powers of two >= 16 "
                         f"and query_block must divide block_size={block_size}.")
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    k_tile = min(tile, block_size)
    rows = 1
    if shared_group_lists:
        rows = packed_rows(heads, kv_heads, min(tile, query_block * (heads // kv_heads)), k_tile,
                           d)
    q_tile = min(tile, query_block * rows)
    op = _differentiable(block_size, query_block, q_tile, k_tile, rows, window, float(scale),
                         interpret)
    if rows == 1:
        return op(q, k, v, block_indices, slot_mask)
    batch, _, seq_len, slots = slot_mask.shape
    mask = slot_mask.reshape(batch, kv_heads, rows, seq_len, slots).swapaxes(2, 3)
    mask = mask.reshape(batch, kv_heads, seq_len * rows, slots)
    out = op(pack_group_rows(q, rows), k, v, block_indices[:, ::rows], mask)
    return unpack_group_rows(out, rows)
