"""Which routed (token, slot) pairs an expert takes: the sort by expert, and capacity's drops.

Shapes: T tokens, k experts per token, E experts. A (token, slot) pair is token t's j-th choice
`expert_index[t, j]`. The experts themselves run in `expert_parallel.run_experts` (sorted rows,
grouped matmuls: dropless, MegaBlocks, Gale et al. 2023), which skips the pairs capacity drops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(expert_index: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """`expert_index` [N] -> (order [N]: a stable sort of the entries by expert, group_sizes
    [E] int32: entries per expert). Entries equal to `num_experts` (a dropped pair's sentinel)
    sort last and count in no group."""
    order = jnp.argsort(expert_index, stable=True)
    counts = jnp.bincount(expert_index, length=num_experts + 1)
    return order, counts[:num_experts].astype(jnp.int32)


def capacity_positions(expert_index: jax.Array, num_experts: int,
                       capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each pair's place in its expert's queue and whether it fits: [T, k] -> (position [T, k]
    int32, keep [T, k] bool = position < capacity).

    Priority (GShard, Lepikhin et al. 2020; Switch): every token's first choice, in token order,
    then every token's second choice, and so on; pair (t, j) precedes (t', j') iff
    (j, t) < (j', t'). A pair past the first `capacity` of its expert's queue is dropped.
    """
    num_tokens, topk = expert_index.shape
    slot_major = expert_index.T.reshape(-1)  # entry q = j T + t
    order, group_sizes = sort_by_expert(slot_major, num_experts)
    group_start = jnp.cumsum(group_sizes) - group_sizes
    rank_sorted = jnp.arange(slot_major.size, dtype=jnp.int32) - group_start[slot_major[order]]
    position = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted, unique_indices=True)
    position = position.reshape(topk, num_tokens).T
    return position, position < capacity
