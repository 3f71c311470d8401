"""Pallas GPU (Triton) kernels of block-sparse attention: flash attention (Dao 2023,
"FlashAttention-2") whose key loop walks a query block's list of key blocks instead of the whole
sequence.

Work is cut in tiles of `tile` rows (`TILE` = 64, or the block when smaller); a block of
`block_size` tokens is `block_size / tile` tiles (MoBA's 512-token blocks: 8).
- Forward, grid (query tiles, batch, heads): a program keeps its `[tile, d]` queries on chip
  and, for each listed slot l of its query block and each key tile of that block, reads the
  keys of block `block_indices[b, h, i, l]` of its kv head by that index, masks them (slot mask
  column l, causality, window) and folds them into the online softmax (fp32, base 2). It writes
  the output and the log-sum-exp of the scaled scores (natural log; 0 for a query that sees no
  key, whose output is 0).
- dq, grid (query tiles, batch, heads): the same walk, `dq += dS K` with
  `dS = P * (dO V^T - delta)`, `P = exp(S - lse)`, `delta = rowsum(dO * O)`.
- dk / dv, grid (key tiles, batch, kv heads): a program owns one key tile of one kv head and
  walks the (q head of its group, query block, slot) entries that list its block, each in
  query steps (`dkdv_query_tile`), in a fixed order: the inverse lists are built outside the
  kernel with jnp (a stable sort of the entries by key block, CSR offsets), so no atomics are
  needed and the gradients are deterministic.

Unused slots (-1) and (query, key) tile pairs wholly in the future or outside the window are
skipped (`lax.cond`; the dk / dv lists leave out whole blocks of that kind). Matmul operands are
in the input dtype (bf16 in training: the tensor cores), accumulated in fp32. A ragged last
block is zero-padded, its rows masked through the slot mask (padding reads nothing) and
causality (no real query reads a padded key). `block_size` and `d` must be powers of two >= 16
(Triton's `dot`); `op.py` sends other shapes to the XLA path. Registers on sm_90a:
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

from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.tiling import is_pow2

LOG2E = math.log2(math.e)
TILE = 64  # query and key rows per tile: blocks larger than this are walked in tiles
NUM_STAGES = 2


def supported(block_size: int, d: int) -> bool:
    """Whether the kernels take these sizes (Triton's `dot` wants powers of two >= 16)."""
    return is_pow2(block_size, 16) and is_pow2(d, 16)


def default_tile(block_size: int) -> int:
    """Rows of a query or key tile: the block, or `TILE` rows of it when it is larger."""
    return min(block_size, TILE)


def dkdv_query_tile(tile: int, d: int) -> int:
    """Query rows per step of the dk / dv kernel: half a tile from d = 128 on. Its program
    holds two fp32 `[tile, d]` accumulators besides the step's scores; with 64-row query steps
    at d = 128 ptxas used all 255 registers (no spills yet), with 32 rows 207 (sm_90a, block
    512)."""
    return max(16, tile // 2) if d >= 128 else tile


def num_warps(tile: int, d: int) -> int:
    """Warps per program: 4 up to a 64 x 64 tile, 8 above (as JAX's flash kernel)."""
    return 4 if tile * d <= 64 * 64 else 8


def overlaps(k_first, k_len: int, q_first, q_len: int, window: int | None):
    """Whether some query in `[q_first, q_first + q_len)` may see some key in
    `[k_first, k_first + k_len)`: a key not after the last query and, with a window, the last
    key inside the window of the first query (the pair (max(q_first, k_first), its nearest key)
    then is visible). Scalars in a kernel, arrays in jnp."""
    ok = k_first <= q_first + q_len - 1
    if window is not None:
        ok &= k_first + k_len - 1 > q_first - window
    return ok


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


def _key_tiles(idx_ref, q_first, *, block_size, tile, window, body, init):
    """Folds `body(slot, k_first, carry)` over the key tiles of the listed blocks that queries
    `[q_first, q_first + tile)` may see, in (slot, tile) order; other tiles are skipped."""
    per_block = block_size // tile

    def step(t, carry):
        slot, c = lax.div(t, per_block), lax.rem(t, per_block)  # t >= 0: C division
        j = idx_ref[slot]
        k_first = j * block_size + c * tile
        reads = (j >= 0) & overlaps(k_first, tile, q_first, tile, window)
        return lax.cond(reads, lambda x: body(slot, k_first, x), lambda x: x, carry)

    return lax.fori_loop(0, idx_ref.shape[0] * per_block, step, init)


def _forward_kernel(idx_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_size,
                    tile, window, scale):
    q_first = pl.program_id(0) * tile
    q = q_ref[...]
    q_pos = q_first + jnp.arange(tile)

    def update(slot, k_first, carry):
        o, m, total = carry
        rows = pl.ds(k_first, tile)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        s = jnp.where(_visible(q_pos, k_first + jnp.arange(tile), mask_ref[slot, :], window), s,
                      -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
        return o, m_new, alpha * total + jnp.sum(p, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((tile,), -jnp.inf, jnp.float32),
            jnp.zeros((tile,), jnp.float32))
    o, m, total = _key_tiles(idx_ref, q_first, block_size=block_size, tile=tile, window=window,
                             body=update, init=init)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    o_ref[...] = (o / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m / LOG2E + jnp.log(total), 0.0)


def _dq_kernel(idx_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               block_size, tile, window, scale):
    q_first = pl.program_id(0) * tile
    q, do = q_ref[...], do_ref[...]
    lse2, delta = lse_ref[...] * LOG2E, delta_ref[...]
    q_pos = q_first + jnp.arange(tile)

    def update(slot, k_first, dq):
        rows = pl.ds(k_first, tile)
        k, v = k_ref[rows, :], v_ref[rows, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        vis = _visible(q_pos, k_first + jnp.arange(tile), mask_ref[slot, :], window)
        p = jnp.where(vis, jnp.exp2(s - lse2[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _key_tiles(idx_ref, q_first, block_size=block_size, tile=tile, window=window,
                    body=update, init=jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(offsets_ref, entries_ref, mask_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, block_size, tile, q_tile, num_q_blocks, slots,
                 window, scale):
    t, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    per_block = block_size // tile
    k_first = t * tile
    cell = (b * pl.num_programs(2) + g) * num_q_blocks + lax.div(t, per_block)
    k, v = k_ref[...], v_ref[...]
    k_pos = k_first + jnp.arange(tile)

    def query_tile(h, slot, q_first, carry):
        dk, dv = carry
        rows = pl.ds(q_first, q_tile)
        q, do = q_ref[rows, h, :], do_ref[rows, h, :]
        s = _dot(q, k, trans_b=True) * (scale * LOG2E)
        vis = _visible(q_first + jnp.arange(q_tile), k_pos, mask_ref[h, slot, rows], window)
        p = jnp.where(vis, jnp.exp2(s - lse_ref[h, rows][:, None] * LOG2E), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[h, rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    def entry(e, carry):
        code = entries_ref[e]  # (head in group, query block, slot)
        slot, i = lax.rem(code, slots), lax.rem(lax.div(code, slots), num_q_blocks)
        h = lax.div(code, slots * num_q_blocks)

        def sub(r, carry):
            q_first = i * block_size + r * q_tile
            return lax.cond(overlaps(k_first, tile, q_first, q_tile, window),
                            lambda x: query_tile(h, slot, q_first, x), lambda x: x, carry)

        return lax.fori_loop(0, block_size // q_tile, sub, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(offsets_ref[cell], offsets_ref[cell + 1], entry, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def key_block_lists(block_indices: jax.Array, kv_heads: int, block_size: int,
                    window: int | None) -> tuple[jax.Array, jax.Array]:
    """The inverse of the block lists, for the dk / dv kernel.

    block_indices `[batch, heads, n, L]` -> `(offsets [batch * kv_heads * n + 1],
    entries [batch * heads * n * L])`, int32: the entries that read key block j of kv head g of
    batch b are `entries[offsets[c]:offsets[c + 1]]` with `c = (b * kv_heads + g) * n + j`, each
    coded `(head_in_group * n + query_block) * L + slot`, in (head, query block, slot) order (a
    stable sort). Slots that read nothing (unused, a later block, outside the window) are left
    out.
    """
    batch, heads, n, slots = block_indices.shape
    group = heads // kv_heads
    used = (block_indices >= 0) & overlaps(block_indices * block_size, block_size,
                                           jnp.arange(n)[:, None] * block_size, block_size,
                                           window)
    kv = jnp.arange(heads) // group
    cells = batch * kv_heads * n
    cell = (jnp.arange(batch)[:, None, None, None] * kv_heads + kv[:, None, None]) * n
    key = jnp.where(used, cell + block_indices, cells).ravel()
    code = (((jnp.arange(heads) % group)[:, None, None] * n + jnp.arange(n)[:, None]) * slots
            + jnp.arange(slots))
    code = jnp.broadcast_to(code, block_indices.shape).ravel()
    order = jnp.argsort(key, stable=True)
    offsets = jnp.searchsorted(key[order], jnp.arange(cells + 1), side="left")
    return offsets.astype(jnp.int32), code[order].astype(jnp.int32)


def _pad_time(x: jax.Array, padded: int, axis: int = 1) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - x.shape[axis])
    return jnp.pad(x, pad) if padded != x.shape[axis] else x


def _slot_rows(slot_mask: jax.Array, padded: int) -> jax.Array:
    """`[batch, heads, T, L]` bool -> `[batch, heads, L, padded]` int8: a slot's mask for a
    query block is one contiguous row; padding reads nothing."""
    return _pad_time(slot_mask, padded, axis=2).swapaxes(2, 3).astype(jnp.int8)


def _params(tile: int, d: int) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=num_warps(tile, d), num_stages=NUM_STAGES)


def forward(q, k, v, block_indices, slot_mask, *, block_size, tile, window, scale, interpret):
    """`(out [batch, T, heads, d] in q's dtype, lse [batch, heads, n * B] fp32)`."""
    batch, seq_len, heads, d = q.shape
    group = heads // k.shape[2]
    slots = block_indices.shape[3]
    padded = num_blocks(seq_len, block_size) * block_size
    per_block = block_size // tile
    q, k, v = (_pad_time(x, padded) for x in (q, k, v))
    q_tile = pl.BlockSpec((None, tile, None, d), lambda t, b, h: (b, t, h, 0))
    kv_whole = pl.BlockSpec((None, padded, None, d), lambda t, b, h: (b, 0, h // group, 0))
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_size=block_size, tile=tile, window=window,
                          scale=scale),
        grid=(padded // tile, batch, heads),
        in_specs=[pl.BlockSpec((None, None, None, slots),
                               lambda t, b, h: (b, h, t // per_block, 0)),
                  pl.BlockSpec((None, None, slots, tile), lambda t, b, h: (b, h, 0, t)),
                  q_tile, kv_whole, kv_whole],
        out_specs=[q_tile, pl.BlockSpec((None, None, tile), lambda t, b, h: (b, h, t))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded), jnp.float32)],
        compiler_params=_params(tile, d), interpret=interpret,
        name="block_sparse_attention_fwd",
    )(block_indices, _slot_rows(slot_mask, padded), q, k, v)
    return out[:, :seq_len], lse


def backward(q, k, v, block_indices, slot_mask, out, lse, d_out, *, block_size, tile, window,
             scale, interpret):
    """`(dq, dk, dv)` in the dtypes of q, k, v, from the forward's `out` and `lse`."""
    batch, seq_len, heads, d = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    slots = block_indices.shape[3]
    n = num_blocks(seq_len, block_size)
    padded = n * block_size
    per_block = block_size // tile
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    q, k, v, d_out = (_pad_time(x, padded) for x in (q, k, v, d_out))
    delta = _pad_time(delta, padded, axis=2)
    rows = _slot_rows(slot_mask, padded)
    static = dict(block_size=block_size, tile=tile, window=window, scale=scale)

    q_tile = pl.BlockSpec((None, tile, None, d), lambda t, b, h: (b, t, h, 0))
    kv_whole = pl.BlockSpec((None, padded, None, d), lambda t, b, h: (b, 0, h // group, 0))
    stat_tile = pl.BlockSpec((None, None, tile), lambda t, b, h: (b, h, t))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **static),
        grid=(padded // tile, batch, heads),
        in_specs=[pl.BlockSpec((None, None, None, slots),
                               lambda t, b, h: (b, h, t // per_block, 0)),
                  pl.BlockSpec((None, None, slots, tile), lambda t, b, h: (b, h, 0, t)),
                  q_tile, kv_whole, kv_whole, q_tile, stat_tile, stat_tile],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(tile, d), interpret=interpret, name="block_sparse_attention_dq",
    )(block_indices, rows, q, k, v, d_out, lse, delta)

    offsets, entries = key_block_lists(block_indices, kv_heads, block_size, window)
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, b, g: (0,) * x.ndim)
    k_tile = pl.BlockSpec((None, tile, None, d), lambda t, b, g: (b, t, g, 0))
    group_rows = pl.BlockSpec((None, padded, group, d), lambda t, b, g: (b, 0, g, 0))
    group_stats = pl.BlockSpec((None, group, padded), lambda t, b, g: (b, g, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, num_q_blocks=n, slots=slots,
                          q_tile=dkdv_query_tile(tile, d), **static),
        grid=(padded // tile, batch, kv_heads),
        in_specs=[whole(offsets), whole(entries),
                  pl.BlockSpec((None, group, slots, padded), lambda t, b, g: (b, g, 0, 0)),
                  group_rows, k_tile, k_tile, group_rows, group_stats, group_stats],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(tile, d), interpret=interpret,
        name="block_sparse_attention_dkdv",
    )(offsets, entries, rows, q, k, v, d_out, lse, delta)
    return dq[:, :seq_len], dk[:, :seq_len], dv[:, :seq_len]


@functools.cache
def _differentiable(block_size: int, tile: int, window: int | None, scale: float,
                    interpret: bool):
    static = dict(block_size=block_size, tile=tile, window=window, scale=scale,
                  interpret=interpret)

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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
              slot_mask: jax.Array, *, block_size: int, window: int | None, scale: float,
              interpret: bool = False, tile: int | None = None) -> jax.Array:
    """Block-sparse attention by the Triton kernels, differentiable w.r.t. q, k, v.

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]` (one dtype), block_indices
    `[batch, heads, ceil(T / B), L]` int32 (-1 unused), slot_mask `[batch, heads, T, L]` bool
    -> `[batch, T, heads, d]` in q's dtype. Needs `supported(block_size, d)`. `tile`: rows of
    the query and key tiles, a power of two >= 16 dividing `block_size` (default
    `default_tile`).
    """
    tile = default_tile(block_size) if tile is None else tile
    if not (is_pow2(tile, 16) and block_size % tile == 0):
        raise ValueError(f"tile={tile} must be a power of two >= 16 dividing block_size="
                         f"{block_size}.")
    return _differentiable(block_size, tile, window, float(scale), interpret)(
        q, k, v, block_indices, slot_mask)
