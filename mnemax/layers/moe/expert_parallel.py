"""Expert parallelism: each device holds E / n of the experts and the tokens travel to them.

Inside `shard_map` over the `expert` mesh axis (n devices, the E experts split into n
contiguous blocks of E_loc = E / n), every device starts with its own tokens `[T, D]` and their
(token, slot) pairs' global expert ids `[T, k]`:

1. the T k pairs are sorted by expert id (so by destination device, then by local expert) and
   written into a send buffer `[n, S, D]`, row block j for device j; the per-(device, local
   expert) counts go along (`[n, E_loc]`);
2. `all_to_all` swaps the blocks: device j receives `[n, S, D]`, block s the pairs device s sent
   it, each block sorted by local expert;
3. the received rows are sorted by local expert across the n blocks and run through the local
   experts as one grouped matmul per product (`expert_fn(rows, group_sizes [E_loc])`);
4. the outputs go back into their received slots, a second `all_to_all` returns them, and each
   pair reads its row from the slot it was sent from.

Fixed shapes: XLA:CPU has no `ragged_all_to_all`, so the exchange is a padded `all_to_all`
whose block holds `S = T k` rows (every pair of a device could go to one device: dropless needs
that bound; rows past a block's count are zeros, skipped by the grouped matmul). A pair that is
not kept (capacity mode's drops) is not sent and reads zeros. Gradients flow through both
exchanges (`all_to_all` transposes to the reverse exchange) and the gathers and scatters.
GShard (Lepikhin et al. 2020) and MegaBlocks (Gale et al. 2023) describe the scheme; MaxText's
`moe.py` (its `ragged_all_to_all` path) and torchtitan's expert parallel do the same exchange.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _axis_size(axis: str | tuple[str, ...]) -> int:
    """Devices along `axis` (static: it sets the exchange's shapes)."""
    mesh = jax.sharding.get_abstract_mesh()
    size = 1
    for name in (axis,) if isinstance(axis, str) else axis:
        size *= mesh.shape[name]
    return size


def exchange_through_experts(x: jax.Array, expert_index: jax.Array, keep: jax.Array,
                             expert_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                             num_experts: int, axis: str | tuple[str, ...]) -> jax.Array:
    """Each kept (token, slot) pair through its expert on the device that holds it.

    Called inside `shard_map` with `axis` the mesh axis (or axes) the experts are split over.
    x `[T, D]` this device's tokens; expert_index `[T, k]` int global expert ids; keep `[T, k]`
    bool (False: the pair is dropped and gets zeros); `expert_fn(rows [M, D], group_sizes
    [E_loc]) -> [M, D]` applies this device's experts to rows sorted by local expert (rows past
    `sum(group_sizes)` must come out as zeros). Returns `[T, k, D]`, each pair's unweighted
    expert output.
    """
    n = _axis_size(axis)
    local_experts = num_experts // n
    num_tokens, topk = expert_index.shape
    d = x.shape[-1]
    pairs = num_tokens * topk
    flat = expert_index.reshape(-1).astype(jnp.int32)
    # Dropped pairs get the sentinel id `num_experts`: sorted last, counted nowhere, never sent.
    flat = jnp.where(keep.reshape(-1), flat, num_experts)
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    per_device = counts.reshape(n, local_experts)  # [n, E_loc] pairs sent per local expert
    sent = jnp.sum(per_device, axis=1)  # [n]
    device_start = jnp.cumsum(sent) - sent
    sorted_ids = flat[order]
    dest = jnp.minimum(sorted_ids // local_experts, n)  # n: dropped
    slot = jnp.arange(pairs, dtype=jnp.int32) - device_start[jnp.minimum(dest, n - 1)]
    rows = x[order // topk]  # pair p = t k + j belongs to token p // k
    send = jnp.zeros((n, pairs, d), x.dtype).at[dest, slot].set(rows, mode="drop",
                                                               unique_indices=True)
    received = jax.lax.all_to_all(send, axis, 0, 0, tiled=False)  # [n, S, D] by source
    received_counts = jax.lax.all_to_all(per_device, axis, 0, 0, tiled=False)  # [n, E_loc]

    # Local expert of every received row; rows past a block's count get E_loc (sorted last).
    block_end = jnp.cumsum(received_counts, axis=1)  # [n, E_loc]
    position = jnp.arange(pairs, dtype=jnp.int32)
    local = jnp.sum(position[None, :, None] >= block_end[:, None, :], axis=-1)  # [n, S]
    local = local.reshape(-1)
    local_order = jnp.argsort(local, stable=True)
    group_sizes = jnp.sum(received_counts, axis=0).astype(jnp.int32)  # [E_loc]
    out_sorted = expert_fn(received.reshape(n * pairs, d)[local_order], group_sizes)
    out = jnp.zeros_like(out_sorted).at[local_order].set(out_sorted, unique_indices=True)
    returned = jax.lax.all_to_all(out.reshape(n, pairs, d), axis, 0, 0, tiled=False)

    # Pair order: sorted position i came from (dest[i], slot[i]); dropped pairs read zeros.
    y_sorted = returned.at[dest, slot].get(mode="fill", fill_value=0)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return y.reshape(num_tokens, topk, d)
