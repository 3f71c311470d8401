"""Mosaic (Pallas TPU) kernels of block-sparse attention: key/value blocks chosen per (query
group, slot) by block lists read through scalar prefetch.

Semantics: `masked_reference` (block lists with `-1` slots, the per-token slot mask, causal and
optional window inside blocks, GQA, zero output for a query that reads no key). Splash
attention's masks are static (built on the host from a numpy mask), so they cannot carry lists
a router chooses per batch; here the lists are a kernel operand. Online softmax as
FlashAttention-2 (Dao, 2023): running max and sum in fp32, the output rescaled as the max grows.

**Scalar prefetch.** `block_indices` becomes one int32 code per (batch, head, query group,
slot), in SMEM before the grid starts (`PrefetchScalarGridSpec`): `j >= 0` for a step that reads
key block j, `-1 - j` for a step that is skipped (an unused slot, a block entirely after the
query group, or one entirely outside the window) but still fetches block j, the block of the
previous live slot, so that Pallas elides the copy (it does when consecutive steps name the same
block). The k/v index maps decode `max(c, -1 - c)`; the kernel tests `c >= 0` with `pl.when`.

**Kernels** (`pallas_tpu_kernels`): forward and dq on a (batch, head, query group, slot) grid,
dk/dv on a walk over the triples sorted by key block; scores transposed so that per-query
values are lane rows. The slot mask travels as one int32 per token (bit l: the token reads
slot l; L <= 32). Scalar-prefetch operands live in SMEM (1 MiB), so large inputs run in several
kernel calls over slices of (batch, heads) (`SMEM_WORDS`).

Tiles: block_size and query_block (the tokens sharing one list; default block_size) multiples
of 16 (bf16 sublane tiling of the `[B, d]` and `[Q, d]` tiles) and d in {64, 128, 256} for the
compiled kernel; interpret mode takes any. The per-query rows `[.., nq8, Q]` are padded to 128
lanes in HBM: 4 bytes per token and head each at Q >= 128, 32 at Q = 16 (beside q's 2d).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mnemax.errors import ConfigError
from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks
from mnemax.layers.kernels.block_sparse_attention.pallas_tpu_kernels import (
    Statics,
    d_key_value,
    d_query,
    forward,
    row_groups,
)

HEAD_DIMS = (64, 128, 256)
SUBLANES = 16  # rows of a bf16 tile: key blocks and query groups are whole tiles
MAX_SLOTS = 32  # slot-mask bits in one int32 per token
# Scalar-prefetch words per kernel call. SMEM holds 1 MiB (256 Ki words); a 1 MiB operand
# overflowed it by 1.1 KiB (measured, v5p compile-only). Larger inputs go in several calls.
SMEM_WORDS = 160 * 1024


def unsupported_reason(head_dim: int, block_size: int, num_slots: int,
                       interpret: bool = False, query_block: int | None = None) -> str | None:
    """Why the kernels cannot take these shapes (None: they can)."""
    if num_slots > MAX_SLOTS:
        return (f"{num_slots} slots per list exceed {MAX_SLOTS} (the slot mask travels as the "
                f"bits of one int32 per token); list at most {MAX_SLOTS} blocks")
    if interpret:
        return None
    if block_size % SUBLANES:
        return (f"block_size={block_size} is not a multiple of {SUBLANES} (bf16 sublane tiling "
                "of the key tiles); use 16, 32, 64, ... or the XLA path")
    if (query_block or block_size) % SUBLANES:
        return (f"query_block={query_block} is not a multiple of {SUBLANES} (bf16 sublane "
                "tiling of the query tiles); use 16, 32, ... or the XLA path")
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one of {HEAD_DIMS}; use the XLA path"
    return None


def _heads_major(x, padded_len):
    """`[B, T, heads, d]` -> `[B, heads, padded_len, d]` (zero tokens appended)."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded_len - x.shape[2]), (0, 0)))


def _query_rows(x, query_block: int, groups: int):
    """`[B, T, heads]` -> `[B, heads, row_groups(groups), query_block]`: one lane row per query
    group (`pallas_tpu_kernels`), zero-padded."""
    rows = row_groups(groups)
    x = jnp.swapaxes(x, 1, 2)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, rows * query_block - x.shape[2])))
    return x.reshape(*x.shape[:2], rows, query_block)


def _chunks(batch: int, heads: int, group: int, per_q_head: int, per_kv_head: int = 0):
    """Slices `(b0, b1, n0, n1)` of (batch, q heads), one kernel call each, whose scalar-prefetch
    operands (`per_q_head` words per q head and `per_kv_head` per kv head) fit `SMEM_WORDS`:
    several batch rows while they fit, else whole GQA groups of one row, else parts of one group
    (the dk/dv calls of a group's parts are then summed)."""
    kv_heads, per_group = heads // group, group * per_q_head + per_kv_head
    if kv_heads * per_group <= SMEM_WORDS:
        rows = SMEM_WORDS // (kv_heads * per_group)
        return [(b, min(b + rows, batch), 0, heads) for b in range(0, batch, rows)]
    if per_group <= SMEM_WORDS:
        span = SMEM_WORDS // per_group * group
        return [(b, b + 1, n, min(n + span, heads))
                for b in range(batch) for n in range(0, heads, span)]
    span = (SMEM_WORDS - per_kv_head) // per_q_head
    if span < 1:
        raise ConfigError(f"block-sparse attention TPU kernel: one head's block lists take "
                          f"{per_q_head + per_kv_head} SMEM words, over {SMEM_WORDS}; use larger "
                          "blocks, fewer slots or the XLA path")
    return [(b, b + 1, n, min(n + span, g + group)) for b in range(batch)
            for g in range(0, heads, group) for n in range(g, g + group, span)]


def _kv_range(n0: int, n1: int, group: int) -> slice:
    return slice(n0 // group, (n1 - 1) // group + 1)


def _assemble(pieces: dict) -> jax.Array:
    """`{(b0, b1, h0, h1): [b1 - b0, h1 - h0, ...]}` in (b0, h0) order -> the whole array."""
    rows: dict = {}
    for (b0, b1, _, _), piece in pieces.items():
        rows.setdefault((b0, b1), []).append(piece)
    return jnp.concatenate([jnp.concatenate(row, axis=1) for row in rows.values()], axis=0)


def _forward(q, k, v, codes, bits, st: Statics):
    """`forward` on the op's layouts, in SMEM-sized calls: out `[B, T, H, d]`, lse."""
    (batch, heads, nq, slots), tp = codes.shape, codes.shape[2] * st.q_rows
    group = heads // k.shape[2]
    qh, kh, vh = _heads_major(q, tp), _heads_major(k, tp), _heads_major(v, tp)
    outs, lses = {}, {}
    for b0, b1, n0, n1 in _chunks(batch, heads, group, nq * slots):
        b, n, g = slice(b0, b1), slice(n0, n1), _kv_range(n0, n1, group)
        outs[b0, b1, n0, n1], lses[b0, b1, n0, n1] = forward(
            qh[b, n], kh[b, g], vh[b, g], codes[b, n], bits[b, n], st)
    return jnp.swapaxes(_assemble(outs), 1, 2)[:, :q.shape[1]], _assemble(lses)


def _backward(q, k, v, codes, bits, out, lse, d_out, st: Statics):
    """dq, dk, dv on the op's layouts, in SMEM-sized calls."""
    (batch, heads, nq, slots), tp = codes.shape, codes.shape[2] * st.q_rows
    group, seq_len = heads // k.shape[2], q.shape[1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    qh, kh, vh = _heads_major(q, tp), _heads_major(k, tp), _heads_major(v, tp)
    doh, delta = _heads_major(d_out.astype(q.dtype), tp), _query_rows(delta, st.q_rows, nq)
    dqs = {}
    for b0, b1, n0, n1 in _chunks(batch, heads, group, nq * slots):
        b, n, g = slice(b0, b1), slice(n0, n1), _kv_range(n0, n1, group)
        dqs[b0, b1, n0, n1] = d_query(qh[b, n], kh[b, g], vh[b, g], doh[b, n], lse[b, n],
                                      delta[b, n], bits[b, n], codes[b, n], st)
    # the sorted triples take 3 words each: one per (head, query group, slot), one per key block
    chunks = _chunks(batch, heads, group, 3 * nq * slots, 3 * (tp // st.block_size))
    split = any(n1 - n0 < group for _, _, n0, n1 in chunks)
    dks, dvs = {}, {}
    for b0, b1, n0, n1 in chunks:
        b, n, g = slice(b0, b1), slice(n0, n1), _kv_range(n0, n1, group)
        key = (b0, b1, g.start, g.stop)
        dk, dv = d_key_value(qh[b, n], kh[b, g], vh[b, g], doh[b, n], lse[b, n], delta[b, n],
                             bits[b, n], codes[b, n], st, jnp.float32 if split else None)
        dks[key] = [*dks.get(key, []), dk]
        dvs[key] = [*dvs.get(key, []), dv]
    dk, dv = (_assemble({c: functools.reduce(jnp.add, p) for c, p in parts.items()})
              .astype(k.dtype) for parts in (dks, dvs))
    dq = jnp.swapaxes(_assemble(dqs), 1, 2)[:, :seq_len]
    return dq, jnp.swapaxes(dk, 1, 2)[:, :seq_len], jnp.swapaxes(dv, 1, 2)[:, :seq_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, codes, bits, st: Statics):
    return _forward(q, k, v, codes, bits, st)[0]


def _attention_fwd(q, k, v, codes, bits, st):
    out, lse = _forward(q, k, v, codes, bits, st)
    return out, (q, k, v, codes, bits, out, lse)


def _attention_bwd(st, residuals, d_out):
    return *_backward(*residuals, d_out, st), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def slot_codes(block_indices: jax.Array, block_size: int, window: int | None,
               query_block: int | None = None) -> jax.Array:
    """`[B, H, nq, L]` int32: `j` where the step reads key block `j`, `-1 - j` where it is
    skipped (unused slot, block after the query group, block outside the window) and fetches
    `j`, the previous live slot's block (the first live one's for leading skips, else the key
    block holding the query group)."""
    nq, slots = block_indices.shape[2:]
    qb = query_block or block_size
    idx = block_indices.astype(jnp.int32)
    i = jnp.arange(nq, dtype=jnp.int32)[:, None]
    live = (idx >= 0) & (idx * block_size <= (i + 1) * qb - 1)  # starts by the last query
    if window is not None:  # the block's last key is inside the first query's window
        live &= (idx + 1) * block_size - 1 > i * qb - window
    nxt = jnp.broadcast_to(i[:, 0] * qb // block_size, idx.shape[:3])
    for s in reversed(range(slots)):
        nxt = jnp.where(live[..., s], idx[..., s], nxt)
    fetch = []
    for s in range(slots):
        nxt = jnp.where(live[..., s], idx[..., s], nxt)
        fetch.append(nxt)
    return jnp.where(live, idx, -1 - jnp.stack(fetch, axis=-1))


def slot_bits(slot_mask: jax.Array | None, shape: tuple[int, int, int], query_block: int,
              groups: int) -> jax.Array:
    """`[B, H, row_groups(groups), query_block]` int32 whose bit l says that the token reads
    slot l (padding tokens read nothing). shape: (B, T, H)."""
    batch, seq_len, heads = shape
    if slot_mask is None:
        words = jnp.full((batch, heads, seq_len), -1, jnp.int32)
    else:
        bits = jnp.left_shift(jnp.int32(1), jnp.arange(slot_mask.shape[-1], dtype=jnp.int32))
        words = jnp.sum(jnp.where(slot_mask, bits, 0), axis=-1, dtype=jnp.int32)
    return _query_rows(jnp.swapaxes(words, 1, 2), query_block, groups)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, block_indices: jax.Array,
              slot_mask: jax.Array | None = None, *, block_size: int, window: int | None = None,
              scale: float | None = None, interpret: bool = False,
              query_block: int | None = None) -> jax.Array:
    """Block-sparse attention by the Mosaic kernels (contract: `masked_reference`).

    q `[batch, T, heads, d]`, k, v `[batch, T, kv_heads, d]`, block_indices
    `[batch, heads, ceil(T / query_block), L]` int (-1 = unused; query_block divides
    block_size, None = block_size), slot_mask `[batch, heads, T, L]` bool or None ->
    `[batch, T, heads, d]` in q's dtype; differentiable w.r.t. q, k, v. Raises ConfigError for
    shapes the kernels do not take (`unsupported_reason`).
    """
    batch, seq_len, heads, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, seq_len) or k.shape[3] != d \
            or heads % k.shape[2]:
        raise ConfigError(f"block-sparse attention: k {k.shape} and v {v.shape} must be "
                          f"[{batch}, {seq_len}, kv_heads, {d}] with kv_heads dividing {heads}")
    qb = query_block or block_size
    if block_size % qb:
        raise ConfigError(f"query_block={qb} must divide block_size={block_size}")
    nq = num_blocks(seq_len, qb)
    if block_indices.ndim != 4 or block_indices.shape[:3] != (batch, heads, nq):
        raise ConfigError(f"block_indices {block_indices.shape} must be [{batch}, {heads}, {nq}, "
                          f"L] (ceil(T / query_block) = {nq} query groups)")
    slots = block_indices.shape[3]
    if slot_mask is not None and slot_mask.shape != (batch, heads, seq_len, slots):
        raise ConfigError(f"slot_mask {slot_mask.shape} must be [{batch}, {heads}, {seq_len}, "
                          f"{slots}] or None")
    if window is not None and window < 1:
        raise ConfigError(f"window={window} must be >= 1 (it counts the query) or None")
    reason = unsupported_reason(d, block_size, slots, interpret, qb)
    if reason:
        raise ConfigError(f"block-sparse attention TPU kernel: {reason}")
    st = Statics(block_size, window, d ** -0.5 if scale is None else float(scale), interpret,
                 qb)
    padded = num_blocks(seq_len, block_size) * block_size  # whole key blocks and query groups
    lists = jnp.pad(block_indices, [(0, 0), (0, 0), (0, padded // qb - nq), (0, 0)],
                    constant_values=-1)
    codes = slot_codes(lists, block_size, window, qb)
    bits = slot_bits(slot_mask, (batch, seq_len, heads), qb, padded // qb)
    return _attention(q, k, v, codes, bits, st)
