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

Two exchanges (`exchange`): on TPU `ragged_all_to_all`, which moves only the kept rows, one
slice per (device, local expert) written where that expert's group starts on the receiver, so
rows arrive sorted (as MaxText's `ragged_all_to_all` path); elsewhere (XLA:CPU has no ragged
collective; GPU pending a measurement) a padded `all_to_all` whose blocks hold `S = T k` rows
(every pair of a device could go to one device: dropless needs that bound; rows past a block's
count are zeros, skipped by the grouped matmul). Either way the receive buffer holds the
dropless bound n T k rows. A pair that is not kept (capacity mode's drops) is not sent and
reads zeros. Gradients flow through both exchanges (each transposes to the reverse exchange)
and the gathers and scatters.
GShard (Lepikhin et al. 2020) and MegaBlocks (Gale et al. 2023) describe the scheme; MaxText's
`moe.py` (its `ragged_all_to_all` path) and torchtitan's expert parallel do the same exchange.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mnemax.errors import ConfigError
from mnemax.layers import axes
from mnemax.layers.kernels.grouped_matmul import grouped_matmul
from mnemax.layers.moe.dispatch import sort_by_expert


def _axis_size(axis: str | tuple[str, ...]) -> int:
    """Devices along `axis` (static: it sets the exchange's shapes)."""
    return axes.mesh_axis_size(axis)


Exchange = Literal["auto", "padded", "ragged"]


def _sorted_pairs(x: jax.Array, expert_index: jax.Array, keep: jax.Array, num_experts: int,
                  n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """This device's kept pairs sorted by global expert (so by destination device, then local
    expert): (order [P], rows [P, D] in that order, counts [n, E_loc] pairs per (device, local
    expert)). Dropped pairs get the sentinel id `num_experts`: sorted last, counted nowhere."""
    topk = expert_index.shape[1]
    flat = jnp.where(keep.reshape(-1), expert_index.reshape(-1).astype(jnp.int32), num_experts)
    order, counts = sort_by_expert(flat, num_experts)
    return order, x[order // topk], counts.reshape(n, num_experts // n)


def _padded_exchange(x, expert_index, keep, expert_fn, num_experts, axis, n):
    """Steps 1-4 with `all_to_all` of `[n, S, D]` blocks, S = T k (see the module docstring)."""
    num_tokens, topk = expert_index.shape
    d = x.shape[-1]
    pairs = num_tokens * topk
    order, rows, per_device = _sorted_pairs(x, expert_index, keep, num_experts, n)
    sent = jnp.sum(per_device, axis=1)  # [n]
    device_start = jnp.cumsum(sent) - sent
    position = jnp.arange(pairs, dtype=jnp.int32)
    # Destination of each sorted pair (n: dropped, past every device's block).
    dest = jnp.sum(position[:, None] >= jnp.cumsum(sent)[None, :], axis=1)
    slot = position - device_start[jnp.minimum(dest, n - 1)]
    send = jnp.zeros((n, pairs, d), x.dtype).at[dest, slot].set(rows, mode="drop",
                                                               unique_indices=True)
    received = jax.lax.all_to_all(send, axis, 0, 0, tiled=False)  # [n, S, D] by source
    received_counts = jax.lax.all_to_all(per_device, axis, 0, 0, tiled=False)  # [n, E_loc]

    # Local expert of every received row; rows past a block's count get E_loc (sorted last).
    block_end = jnp.cumsum(received_counts, axis=1)  # [n, E_loc]
    local = jnp.sum(position[None, :, None] >= block_end[:, None, :], axis=-1)  # [n, S]
    local_order = jnp.argsort(local.reshape(-1), stable=True)
    group_sizes = jnp.sum(received_counts, axis=0).astype(jnp.int32)  # [E_loc]
    out_sorted = expert_fn(received.reshape(n * pairs, d)[local_order], group_sizes)
    out = jnp.zeros_like(out_sorted).at[local_order].set(out_sorted, unique_indices=True)
    returned = jax.lax.all_to_all(out.reshape(n, pairs, d), axis, 0, 0, tiled=False)

    # Pair order: sorted position i came from (dest[i], slot[i]); dropped pairs read zeros.
    y_sorted = returned.at[dest, slot].get(mode="fill", fill_value=0)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
    return y.reshape(num_tokens, topk, d)


def _ragged_exchange(x, expert_index, keep, expert_fn, num_experts, axis, n,
                     ragged_all_to_all=jax.lax.ragged_all_to_all):
    """Steps 1-4 with `ragged_all_to_all`: only the kept pairs travel, one slice per
    (destination device, local expert), each written on its receiver where that expert's group
    starts plus what earlier sources sent it, so the received rows arrive sorted by local
    expert (no sort on the receiving side). The receive buffer still holds the dropless bound
    n T k rows. `ragged_all_to_all` is a parameter so tests can put an emulation in its place
    (XLA:CPU does not implement the collective)."""
    local_experts = num_experts // n
    num_tokens, topk = expert_index.shape
    d = x.shape[-1]
    pairs = num_tokens * topk
    me = jax.lax.axis_index(axis)
    order, rows, per_device = _sorted_pairs(x, expert_index, keep, num_experts, n)
    # counts[s, j, e]: pairs device s sends to local expert e of device j (every device's).
    counts = jax.lax.all_gather(per_device, axis, axis=0, tiled=False)  # [n, n, E_loc]
    group_sizes_all = jnp.sum(counts, axis=0)  # [n, E_loc] rows each device's experts get
    group_start = jnp.cumsum(group_sizes_all, axis=1) - group_sizes_all
    # earlier[s, j, e]: what sources before s send to (j, e); where s's slice lands on j.
    earlier = jnp.cumsum(counts, axis=0) - counts
    landing = group_start[None] + earlier  # [n_src, n_dst, E_loc]
    # Each device's slices, in its sorted order: (destination j, local expert e) row-major.
    flat_counts = counts.reshape(n, n * local_experts)
    send_start = (jnp.cumsum(flat_counts, axis=1) - flat_counts).reshape(n, n, local_experts)

    send_sizes = per_device.reshape(-1)
    input_offsets = send_start[me].reshape(-1)
    output_offsets = landing[me].reshape(-1)
    recv_sizes = counts[:, me].reshape(-1)  # slices from source s, local expert e
    buffer = jnp.zeros((n * pairs, d), x.dtype)
    received = ragged_all_to_all(rows, buffer, input_offsets, send_sizes, output_offsets,
                                 recv_sizes, axis_name=axis)
    out = expert_fn(received, group_sizes_all[me].astype(jnp.int32))
    # The way back: what source s sent to my expert e is at landing[s, me, e] here and returns
    # to send_start[s, me, e] there.
    returned = ragged_all_to_all(out, jnp.zeros((pairs, d), x.dtype),
                                 landing[:, me].reshape(-1), recv_sizes,
                                 send_start[:, me].reshape(-1), send_sizes, axis_name=axis)
    # Dropped pairs sit past every slice: their rows stay zero.
    y = jnp.zeros_like(returned).at[order].set(returned, unique_indices=True)
    return y.reshape(num_tokens, topk, d)


def exchange_through_experts(x: jax.Array, expert_index: jax.Array, keep: jax.Array,
                             expert_fn: Callable[[jax.Array, jax.Array], jax.Array], *,
                             num_experts: int, axis: str | tuple[str, ...],
                             exchange: Exchange = "auto") -> jax.Array:
    """Each kept (token, slot) pair through its expert on the device that holds it.

    Called inside `shard_map` with `axis` the mesh axis (or axes) the experts are split over.
    x `[T, D]` this device's tokens; expert_index `[T, k]` int global expert ids; keep `[T, k]`
    bool (False: the pair is dropped and gets zeros); `expert_fn(rows [M, D], group_sizes
    [E_loc]) -> [M, D]` applies this device's experts to rows sorted by local expert (rows past
    `sum(group_sizes)` must come out as zeros). Returns `[T, k, D]`, each pair's unweighted
    expert output. `exchange`: "ragged" (`ragged_all_to_all`: the kept rows only), "padded"
    (`all_to_all` of `[n, T k, D]` blocks; XLA:CPU has no ragged collective), "auto": ragged
    when lowered for TPU (as MaxText), padded elsewhere (GPU: pending a measurement).
    """
    if exchange not in get_args(Exchange):
        raise ValueError(f"exchange={exchange!r} is not one of {get_args(Exchange)}.")
    n = _axis_size(axis)
    args = (x, expert_index, keep)
    padded = functools.partial(_padded_exchange, expert_fn=expert_fn, num_experts=num_experts,
                               axis=axis, n=n)
    ragged = functools.partial(_ragged_exchange, expert_fn=expert_fn, num_experts=num_experts,
                               axis=axis, n=n)
    if exchange == "padded":
        return padded(*args)
    if exchange == "ragged":
        return ragged(*args)
    return jax.lax.platform_dependent(*args, tpu=ragged, default=padded)


def swiglu_experts(rows: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, *, impl: str = "auto") -> jax.Array:
    """SwiGLU experts over rows sorted by expert: `(silu(x Wg_e) * x Wu_e) Wd_e` for the rows
    of group e, each product one `grouped_matmul` (megablox on TPU, `ragged_dot` elsewhere).
    rows `[M, D]`, group_sizes `[E]`, w_gate / w_up `[E, D, F]`, w_down `[E, F, D]` -> `[M, D]`
    (rows past `sum(group_sizes)` give zeros)."""
    def matmul(a, w):
        return grouped_matmul(a, w, group_sizes, impl=impl)

    return matmul(jax.nn.silu(matmul(rows, w_gate)) * matmul(rows, w_up), w_down)


def _experts_here(x: jax.Array, expert_index: jax.Array, keep: jax.Array,
                  weights: tuple[jax.Array, jax.Array, jax.Array], impl: str) -> jax.Array:
    """Every kept pair through its expert, all experts on this device: `[T, k, D]`."""
    num_experts = weights[0].shape[0]
    num_tokens, topk = expert_index.shape
    flat = jnp.where(keep.reshape(-1), expert_index.reshape(-1), num_experts)
    order, group_sizes = sort_by_expert(flat, num_experts)
    out = swiglu_experts(x[order // topk], group_sizes, *weights, impl=impl)
    y = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    return y.reshape(num_tokens, topk, x.shape[-1])


def run_experts(x: jax.Array, expert_index: jax.Array, keep: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, *, impl: str = "auto") -> jax.Array:
    """Each kept (token, slot) pair through its SwiGLU expert -> `[T, k, D]` (dropped pairs:
    zeros), laid out by the logical rules in context.

    x `[T, D]`, expert_index / keep `[T, k]`, experts as `swiglu_experts`. Without a mesh, or
    with one, the work runs per device inside `shard_map` (the grouped matmul is a Pallas
    kernel on TPU): the tokens split as the batch is (`act_batch`), and the experts split over
    the mesh axes of the `expert` logical axis (expert parallelism: `exchange_through_experts`)
    or, without it, whole on every device (under ZeRO-3 gathered as any FSDP weight is).
    """
    weights = (w_gate, w_up, w_down)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return _experts_here(x, expert_index, keep, weights, impl)
    # One logical axis at a time: flax maps a mesh axis at most once per spec, and under expert
    # parallelism `act_batch` already holds `expert` (the other layers' batch split).
    (token_shards,), (expert_shards,), (mlp_shards,) = (
        axes.shard_counts((a,)) for a in (axes.ACT_BATCH, axes.EXPERT, axes.MLP))
    if mlp_shards > 1:
        raise ConfigError(
            f"model.moe under tensor parallelism (expert width split {mlp_shards} ways over the "
            "tensor mesh axis) is not supported: split MoE models with strategy.mesh axes "
            "data, fsdp and expert (expert parallelism), e.g. data:2,expert:4")
    (token_axes,), (expert_axes,) = (nn.logical_to_mesh_axes((a,))
                                     for a in (axes.ACT_BATCH, axes.EXPERT))
    num_tokens = x.shape[0]
    pad = -num_tokens % token_shards
    if pad:  # a batch too small to split evenly (one sequence at init): dropped pairs
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert_index = jnp.pad(expert_index, ((0, pad), (0, 0)))
        keep = jnp.pad(keep, ((0, pad), (0, 0)))
    tokens = PartitionSpec(token_axes)
    if expert_shards > 1:
        num_experts = w_gate.shape[0]

        def local(x, index, keep, *weights):
            def experts(rows, group_sizes):
                return swiglu_experts(rows, group_sizes, *weights, impl=impl)

            return exchange_through_experts(x, index, keep, experts, num_experts=num_experts,
                                            axis=expert_axes)

        expert_spec = PartitionSpec(expert_axes)
    else:
        def local(x, index, keep, *weights):
            return _experts_here(x, index, keep, weights, impl)

        expert_spec = PartitionSpec()
    fn = jax.shard_map(local, in_specs=(tokens, tokens, tokens, *(expert_spec,) * 3),
                       out_specs=tokens,
                       check_vma=False)  # the Pallas kernel's outputs carry no varying axes
    return fn(x, expert_index, keep, *weights)[:num_tokens]
