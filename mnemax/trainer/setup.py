"""Turns a recipe into jitted, sharded init / train-step / eval-step functions.

This is the one place where the model, the optimizer and the parallel strategy are put together;
the loop, `mnemax show` and the benchmarks all start here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnemax.errors import ConfigError
from mnemax.layers.components.base import MODEL_STATE
from mnemax.layers.roles import param_roles
from mnemax.parallel.mesh import batch_axes, make_mesh
from mnemax.parallel.remat import HOST_MEMORY_KIND, remat_options
from mnemax.parallel.rules import check_rules_cover, logical_axis_rules
from mnemax.parallel.sharding import (
    batch_sharding,
    bytes_per_device,
    check_batch,
    check_divisible,
    check_zero_stage,
    logical_shardings,
)
from mnemax.parallel.zero import zero_layout
from mnemax.trainer.optimizer import make_optimizer, make_schedule
from mnemax.trainer.recipe import Recipe
from mnemax.trainer.step import TrainState, make_eval_step, make_loss_fn, make_train_step

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NAN_POLICIES = ("halt", "skip")


@dataclasses.dataclass
class TrainProgram:
    """Everything needed to run a recipe on a mesh."""

    recipe: Recipe
    mesh: Mesh
    model: nn.Module
    schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs, unboxed
    state_shardings: TrainState  # NamedShardings, same structure
    grad_shardings: Any  # NamedShardings of the gradients (the params' tree)
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], TrainState]  # rng -> sharded state
    train_step: Callable  # (state, batch) -> (state, metrics); donates state
    eval_step: Callable  # (params, batch, model_state) -> mean cross entropy
    loss_fn: Callable  # (params, inputs, targets) -> (objective, metrics), as the step uses it
    tx: optax.GradientTransformation  # the optimizer the step applies
    roles: Any  # the params' tree of roles (mnemax.layers.roles): decay and learning-rate groups

    @property
    def param_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

    @property
    def opt_state_memory_kind(self) -> str:
        """Where the optimizer state lives: "device", or "pinned_host" when offloaded."""
        kinds = {s.memory_kind for s in jax.tree.leaves(
            self.state_shardings.opt_state, is_leaf=lambda x: isinstance(x, NamedSharding))}
        return "pinned_host" if kinds == {HOST_MEMORY_KIND} else "device"

    def memory_per_device(self) -> dict[str, int]:
        """Bytes of params / grads / optimizer state one device holds under this strategy, in
        its device and host memory together (`mnemax.trainer.memory_report.state_bytes` gives
        the two apart)."""
        params, opt_state = self.abstract_state.params, self.abstract_state.opt_state
        return {
            "params_bytes": sum(bytes_per_device(params, self.state_shardings.params)),
            "grads_bytes": sum(bytes_per_device(params, self.grad_shardings)),
            "opt_state_bytes": sum(bytes_per_device(opt_state, self.state_shardings.opt_state)),
        }

    def global_batch(self, local_batch: np.ndarray) -> jax.Array:
        """This process's rows `[global_batch / processes, seq_len + 1]` -> a global array."""
        return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)


def follow_param_shardings(opt_state: Any, params: Any, param_shardings: Any,
                           default: NamedSharding) -> Any:
    """Shardings for optimizer state: a leaf whose tree path ends with a parameter's path (Adam
    moments, in any optax wrapper) and has its shape takes that parameter's sharding; anything
    else (step counters) gets `default`."""
    by_path = {}
    flat_shardings = jax.tree.leaves(param_shardings,
                                     is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                      flat_shardings, strict=True):
        by_path[tuple(path)] = (leaf.shape, sharding)
    longest = max((len(p) for p in by_path), default=0)

    def pick(path, leaf):
        for start in range(max(len(path) - longest, 0), len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def check_host_memory(mesh: Mesh) -> None:
    """Raises ConfigError unless this process's devices in `mesh` have a `pinned_host` memory
    (needed by `strategy.offload_optimizer`). GPU and TPU have it, and so has XLA:CPU (jax
    0.10), where it is the same RAM as the device memory: the placement is honoured, nothing
    is saved."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    kinds = sorted({m.kind for m in local[0].addressable_memories()})
    if HOST_MEMORY_KIND not in kinds:
        raise ConfigError(
            f"strategy.offload_optimizer=true needs a {HOST_MEMORY_KIND!r} memory, but "
            f"{local[0].platform} device {local[0].id} only has {', '.join(kinds)}; set "
            "strategy.offload_optimizer=false (or use ZeRO: strategy.zero_stage=1 shards the "
            "optimizer state over the data-parallel devices instead)"
        )


def _validate_run(recipe: Recipe) -> None:
    run = recipe.run
    if run.compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"run.compute_dtype={run.compute_dtype!r} is unknown; choose one of "
                          f"{', '.join(COMPUTE_DTYPES)}")
    if run.nan_policy not in NAN_POLICIES:
        raise ConfigError(f"run.nan_policy={run.nan_policy!r} is unknown; choose halt or skip")
    if run.grad_accum < 1:
        raise ConfigError(f"run.grad_accum={run.grad_accum} must be >= 1")
    if run.steps < 0:
        raise ConfigError(f"run.steps={run.steps} must be >= 0")


def build_program(recipe: Recipe, devices: Sequence[jax.Device] | None = None) -> TrainProgram:
    """Builds mesh, shardings and jitted functions; validates shapes against the mesh first."""
    _validate_run(recipe)
    strategy = recipe.strategy
    mesh = make_mesh(strategy, devices)
    rules = logical_axis_rules(strategy)
    check_batch(recipe.data.global_batch, recipe.run.grad_accum, mesh)
    check_zero_stage(strategy.zero_stage, mesh)
    try:
        model = recipe.model.build(**remat_options(strategy.remat))
    except ValueError as err:
        raise ConfigError(str(err)) from None

    schedule = make_schedule(recipe.optimizer, recipe.schedule, recipe.run.steps)
    sample = jnp.zeros((1, recipe.data.seq_len), jnp.int32)

    def init_boxed(rng):
        """(params, non-parameter model state), both with their logical axis names."""
        with nn.logical_axis_rules(rules):
            variables = model.init(rng, sample)
        return variables["params"], dict(variables.get(MODEL_STATE, {}))

    boxed_params, boxed_model_state = jax.eval_shape(init_boxed, jax.random.key(0))
    check_rules_cover(boxed_params, rules)
    check_rules_cover(boxed_model_state, rules)
    roles = param_roles(boxed_params)
    tx = make_optimizer(recipe.optimizer, schedule, roles)
    param_shardings = logical_shardings(boxed_params, mesh, rules)
    abstract_params = nn.unbox(boxed_params)
    check_divisible(abstract_params, param_shardings, what="parameter")

    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    layout = zero_layout(strategy.zero_stage, abstract_params, param_shardings)
    grad_shardings = layout.grads
    opt_shardings = follow_param_shardings(abstract_opt, abstract_params,
                                           layout.opt_state_like_params, replicated)
    # Optimizer-state offload (as MaxText's optimizer_memory_host_offload): the state lives in
    # pinned host memory with its ZeRO layout; the step brings it to the device for the update.
    host_opt_shardings = None
    if strategy.offload_optimizer:
        check_host_memory(mesh)
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY_KIND),
                                     opt_shardings)
        host_opt_shardings = opt_shardings
    # Non-parameter model state is laid out by the same logical rules as the parameters.
    model_state_shardings = logical_shardings(boxed_model_state, mesh, rules)
    abstract_model_state = nn.unbox(boxed_model_state)
    check_divisible(abstract_model_state, model_state_shardings, what="model state")
    state_shardings = TrainState(step=replicated, params=layout.params,
                                 opt_state=opt_shardings, model_state=model_state_shardings)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt,
        model_state=abstract_model_state)

    def init(rng):
        params, model_state = nn.unbox(init_boxed(rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=model_state)

    loss_fn = make_loss_fn(model, COMPUTE_DTYPES[recipe.run.compute_dtype],
                           recipe.run.z_loss_weight, rules)
    batch_sh = batch_sharding(mesh)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, batch_axes(mesh)))
    step_fn = make_train_step(loss_fn, tx, schedule, grad_accum=recipe.run.grad_accum,
                              skip_nonfinite=recipe.run.nan_policy == "skip",
                              micro_batch_sharding=micro_sh,
                              grad_shardings=grad_shardings,
                              host_opt_shardings=host_opt_shardings,
                              update_model_state=getattr(recipe.model, "update_model_state",
                                                         None))

    with jax.set_mesh(mesh):
        jit_init = jax.jit(init, out_shardings=state_shardings)
        jit_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_sh),
                           out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        jit_eval = jax.jit(make_eval_step(loss_fn),
                           in_shardings=(param_shardings, batch_sh, model_state_shardings),
                           out_shardings=replicated)

    return TrainProgram(
        recipe=recipe, mesh=mesh, model=model, schedule=schedule,
        abstract_state=abstract_state, state_shardings=state_shardings,
        grad_shardings=grad_shardings, batch_sharding=batch_sh,
        init=_in_mesh(jit_init, mesh), train_step=_in_mesh(jit_step, mesh),
        eval_step=_in_mesh(jit_eval, mesh), loss_fn=loss_fn, tx=tx, roles=roles,
    )


def _in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """Calls (and so traces) `fn` with `mesh` set, which logical constraints need."""

    def call(*args: Any):
        with jax.set_mesh(mesh):
            return fn(*args)

    call.lower = lambda *args: _lower_in_mesh(fn, mesh, *args)  # type: ignore[attr-defined]
    call.jitted = fn  # type: ignore[attr-defined]  # for jax.export (inside `with jax.set_mesh`)
    return call


def _lower_in_mesh(fn: Any, mesh: Mesh, *args: Any):
    with jax.set_mesh(mesh):
        return fn.lower(*args)
