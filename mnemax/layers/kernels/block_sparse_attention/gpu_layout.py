"""Layouts of the Triton kernels' operands built outside the kernels with jnp: the inverse block
lists the dk / dv kernel walks, and the GQA packing of q rows (`pallas_gpu`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnemax.layers.kernels.block_sparse_attention.masked_reference import num_blocks


def overlaps(k_first, k_len: int, q_first, q_len: int, window: int | None):
    """Whether some query in `[q_first, q_first + q_len)` may see some key in
    `[k_first, k_first + k_len)`: a key not after the last query and, with a window, the last
    key inside the window of the first query (the pair (max(q_first, k_first), its nearest key)
    then is visible). Scalars in a kernel, arrays in jnp."""
    ok = k_first <= q_first + q_len - 1
    if window is not None:
        ok &= k_first + k_len - 1 > q_first - window
    return ok


def key_block_lists(block_indices: jax.Array, kv_heads: int, block_size: int,
                    window: int | None, query_block: int | None = None,
                    num_key_blocks: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The inverse of the block lists, for the dk / dv kernel.

    block_indices `[batch, heads, nq, L]` (lists of query groups of `query_block` tokens,
    default block_size) -> `(offsets [batch * kv_heads * n + 1], entries [batch * heads * nq *
    L])`, int32, n = `num_key_blocks` (default nq * query_block / block_size): the entries that
    read key block j of kv head g of batch b are `entries[offsets[c]:offsets[c + 1]]` with
    `c = (b * kv_heads + g) * n + j`, each coded `(head_in_group * nq + query_group) * L +
    slot`, in (head, query group, slot) order (a stable sort). Slots that read nothing (unused,
    a later block, outside the window) are left out.
    """
    batch, heads, nq, slots = block_indices.shape
    query_block = query_block or block_size
    n = num_key_blocks or num_blocks(nq * query_block, block_size)
    group = heads // kv_heads
    used = (block_indices >= 0) & overlaps(block_indices * block_size, block_size,
                                           jnp.arange(nq)[:, None] * query_block, query_block,
                                           window)
    kv = jnp.arange(heads) // group
    cells = batch * kv_heads * n
    cell = (jnp.arange(batch)[:, None, None, None] * kv_heads + kv[:, None, None]) * n
    key = jnp.where(used, cell + block_indices, cells).ravel()
    code = (((jnp.arange(heads) % group)[:, None, None] * nq + jnp.arange(nq)[:, None]) * slots
            + jnp.arange(slots))
    code = jnp.broadcast_to(code, block_indices.shape).ravel()
    order = jnp.argsort(key, stable=True)
    offsets = jnp.searchsorted(key[order], jnp.arange(cells + 1), side="left")
    return offsets.astype(jnp.int32), code[order].astype(jnp.int32)


def pack_group_rows(x: jax.Array, group: int) -> jax.Array:
    """`[batch, T, kv_heads * group, d]` -> `[batch, T * group, kv_heads, d]`: the q heads of a
    GQA group as consecutive rows of their token (row `t * group + n`: head `g * group + n`)."""
    batch, seq_len, heads, d = x.shape
    x = x.reshape(batch, seq_len, heads // group, group, d).swapaxes(2, 3)
    return x.reshape(batch, seq_len * group, heads // group, d)


def unpack_group_rows(x: jax.Array, group: int) -> jax.Array:
    """The inverse of `pack_group_rows`."""
    batch, rows, kv_heads, d = x.shape
    x = x.reshape(batch, rows // group, group, kv_heads, d).swapaxes(2, 3)
    return x.reshape(batch, rows // group, kv_heads * group, d)
