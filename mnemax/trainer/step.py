"""The train and eval step functions (pure; `setup.py` jits them with shardings).

A model is any flax module whose `apply(params, tokens)` returns `(logits, aux)`; the logits are
`[batch, time, vocab]` or `FactoredLogits`, whose loss is computed a chunk at a time. Entries of
`aux` whose name starts with `loss/` are added to the objective (already weighted by the layer
that made them); all other entries are logged as metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mnemax.layers.components.base import MODEL_STATE, STATE_STATS
from mnemax.trainer.loss import cross_entropy

AUX_LOSS_PREFIX = "loss/"


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes: the step counter, fp32 params, optimizer state and
    the model's non-parameter state (`{}` for models without any)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)


# The entry of a loss function's metrics that carries the statistics the model's state update
# needs (averaged over micro-batches with the other metrics; never logged).
STATE_STATS_METRIC = "_state_stats"


def split_batch(batch: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows `[batch, seq_len + 1]` -> inputs `[batch, seq_len]`, targets `[batch, seq_len]`."""
    return batch[:, :-1], batch[:, 1:]


def make_loss_fn(model: nn.Module, compute_dtype: jnp.dtype, z_loss_weight: float,
                 rules: Any) -> Callable:
    """`loss_fn(params, inputs, targets, model_state=None) -> (objective, metrics)` in mixed
    precision.

    fp32 master params are cast to `compute_dtype` here, so gradients come back in fp32; the
    model state stays fp32. `metrics[STATE_STATS_METRIC]` holds what the model recorded for its
    state update (`{}` for models without state).
    """

    def loss_fn(params, inputs, targets, model_state=None):
        compute_params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        variables = {"params": compute_params}
        if model_state:
            variables[MODEL_STATE] = model_state
        with nn.logical_axis_rules(rules):
            (logits, aux), recorded = model.apply(variables, inputs, mutable=[STATE_STATS])
            ce, z = cross_entropy(logits, targets)
        objective = ce + z_loss_weight * z
        metrics = {"loss": ce, "z_loss": z,
                   STATE_STATS_METRIC: dict(recorded.get(STATE_STATS, {}))}
        for name, value in aux.items():
            value = jnp.asarray(value, jnp.float32)
            if name.startswith(AUX_LOSS_PREFIX):
                objective = objective + value
            metrics[name] = value
        return objective, metrics

    return loss_fn


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum: int,
    skip_nonfinite: bool,
    micro_batch_sharding: Any = None,
    grad_shardings: Any = None,
    host_opt_shardings: Any = None,
    update_model_state: Callable | None = None,
) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`.

    `batch` is `[global_batch, seq_len + 1]` int32. With `grad_accum > 1` it is split into
    micro-batches (row j of every device's slice goes to micro-batch j mod grad_accum, so no data
    moves between devices) and gradients are summed in fp32 by a `lax.scan`.
    With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves the params and
    optimizer state unchanged (the step counter still advances).
    `grad_shardings` (the ZeRO layout of the gradients) lays the summed gradients out sharded
    from stage 2 on, so the data-parallel reduction is a reduce-scatter and no device holds the
    full gradients.
    `host_opt_shardings` (optimizer-state offload) are the state's shardings in pinned host
    memory: the state is moved to device memory with the same layout for the update and the
    new state back to the host (MaxText's optimizer_memory_host_offload).
    `update_model_state(state, stats)` updates the model's non-parameter state once per step
    from the statistics averaged over all micro-batches (outside the gradient, so Adam and
    weight decay never see it); a skipped non-finite step leaves it unchanged too.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: jax.Array):
        inputs, targets = split_batch(batch)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(state.params, inputs, targets, state.model_state)
        else:
            def to_micro(x):
                x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
                if micro_batch_sharding is not None:
                    x = jax.lax.with_sharding_constraint(x, micro_batch_sharding)
                return x

            def accumulate(carry, micro):
                grads_sum, metrics_sum = carry
                (_, metrics), grads = grad_fn(state.params, *micro, state.model_state)
                return (jax.tree.map(jnp.add, grads_sum, grads),
                        jax.tree.map(jnp.add, metrics_sum, metrics)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            metrics_shape = jax.eval_shape(
                lambda: grad_fn(state.params, inputs[:1], targets[:1], state.model_state)[0][1])
            metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
            (grads, metrics), _ = jax.lax.scan(
                accumulate, (zeros, metric_zeros), (to_micro(inputs), to_micro(targets)))
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: m / grad_accum, metrics)

        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        grad_norm = optax.tree.norm(grads)
        old_opt_state = state.opt_state
        if host_opt_shardings is not None:
            old_opt_state = jax.device_put(old_opt_state, jax.tree.map(
                lambda s: s.with_memory_kind("device"), host_opt_shardings))
        updates, opt_state = tx.update(grads, old_opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        stats = metrics.pop(STATE_STATS_METRIC)
        model_state = state.model_state
        if update_model_state is not None and model_state:
            model_state = update_model_state(model_state, stats)
        if skip_nonfinite:
            params, opt_state, model_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (params, opt_state, model_state),
                (state.params, old_opt_state, state.model_state))
        if host_opt_shardings is not None:
            opt_state = jax.device_put(opt_state, host_opt_shardings)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               model_state=model_state)
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(optimizer_step(old_opt_state,
                                                                         state.step)),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return train_step


def optimizer_step(opt_state: Any, default: jax.Array) -> jax.Array:
    """The step count optax's schedule reads in `opt_state` (the lr of the update about to be
    applied is `schedule(count)`); `default` when the state has none. With
    `nan_policy=skip` it stops on skipped steps while `TrainState.step` goes on, so the lr is
    logged from this count, not from the train step."""
    counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return counts[0][1] if counts else default


def make_eval_step(loss_fn: Callable) -> Callable:
    """`eval_step(params, batch, model_state={}) -> mean token cross entropy` of one batch."""

    def eval_step(params, batch, model_state=None):
        inputs, targets = split_batch(batch)
        _, metrics = loss_fn(params, inputs, targets, model_state)
        return metrics["loss"]

    return eval_step
