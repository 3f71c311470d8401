"""Two programs that must train alike: run a few steps of each and compare everything a step
produces, not only what survives Adam.

Losses and post-Adam parameters are nearly blind to a gradient scale error: Adam divides the
first moment by the root of the second, so gradients 2x or 1/8 too large give the same update
except where a gradient is near Adam's epsilon, and clipping rescales a large gradient anyway.
(Scaling the sharded run's gradients by 2 moved its parameters by at most 3.6e-5 in 3 steps,
barely over the 1e-5 tolerance.) So a run also records the step's own `grad_norm` and the
gradients of the objective at the initial parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mnemax.parallel.strategy import Strategy
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.recipe import Recipe
from mnemax.trainer.setup import TrainProgram, build_program
from mnemax.trainer.step import TrainState, split_batch
from tests.helpers import SMALL

STEPS = 3


@dataclasses.dataclass(frozen=True)
class Run:
    """What `run_steps` saw."""

    losses: np.ndarray  # [steps] float32, metrics["loss"] of each step
    grad_norms: np.ndarray  # [steps] float32, metrics["grad_norm"]: the step's own gradients
    grads: Any  # numpy tree like the params: d objective / d params at init, first batch
    params: Any  # numpy tree: the parameters after the last step
    state: TrainState  # the final state, sharded as the program shards it
    program: TrainProgram  # the program that ran


def batches(recipe: Recipe, steps: int) -> np.ndarray:
    """`[steps, global_batch, seq_len + 1]` int32 random bytes, the same for every recipe of the
    same batch shape."""
    rng = np.random.default_rng(0)
    shape = (recipe.data.global_batch, recipe.data.seq_len + 1)
    return np.stack([rng.integers(0, 257, shape, dtype=np.int32) for _ in range(steps)])


def gradients(program: TrainProgram, params: Any, batch: np.ndarray) -> Any:
    """d objective / d params `[param shapes]` float32 (numpy) at `params` on `batch`
    `[global_batch, seq_len + 1]`, computed with the program's shardings: its sharded forward
    and backward pass and its reduction of the gradients to `program.grad_shardings`."""

    def grad(params, batch):
        inputs, targets = split_batch(batch)
        return jax.grad(lambda p: program.loss_fn(p, inputs, targets)[0])(params)

    with jax.set_mesh(program.mesh):
        fn = jax.jit(grad, in_shardings=(program.state_shardings.params, program.batch_sharding),
                     out_shardings=program.grad_shardings)
        return jax.device_get(fn(params, program.global_batch(batch)))


_INITIAL_PARAMS: dict[Any, Any] = {}


def initial_params(recipe: Recipe) -> Any:
    """The parameters (numpy) that `program.init(key 0)` gives `recipe`'s model on one device,
    initialised once per model: every run of that model starts from them, so each program
    compiles its step but not its own init (`test_sharding` checks a sharded init gives these
    very parameters)."""
    if recipe.model not in _INITIAL_PARAMS:
        one_device = dataclasses.replace(recipe, strategy=Strategy())
        program = build_program(one_device, jax.devices()[:1])
        _INITIAL_PARAMS[recipe.model] = jax.device_get(program.init(jax.random.key(0)).params)
    return _INITIAL_PARAMS[recipe.model]


def initial_state(program: TrainProgram) -> TrainState:
    """Step 0 with `initial_params`, laid out on the program's shardings (as `program.init`)."""
    params = initial_params(program.recipe)
    state = TrainState(step=np.zeros((), np.int32), params=params,
                       opt_state=program.tx.init(params))
    return jax.device_put(state, program.state_shardings)


def run_steps(recipe: Recipe, devices: Sequence[jax.Device] | None = None,
              steps: int = STEPS) -> Run:
    """Starts from `initial_state`, records the gradients at the initial parameters on the first
    batch, then trains `steps` steps on `batches(recipe, steps)`."""
    program = build_program(recipe, devices)
    state = initial_state(program)
    data = batches(recipe, steps)
    grads = gradients(program, state.params, data[0])  # before train_step donates the state
    losses, grad_norms = [], []
    for batch in data:
        state, metrics = program.train_step(state, program.global_batch(batch))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return Run(np.array(losses), np.array(grad_norms), grads, jax.device_get(state.params), state,
               program)


_RUNS: dict[tuple, Run] = {}


def small_run(*overrides: str, one_device: bool = False) -> Run:
    """`run_steps` of the `small_recipe` with `overrides`, on all devices or on the first one;
    each distinct run is made once per process (every equivalence test compares with a few
    shared baselines)."""
    key = (overrides, one_device)
    if key not in _RUNS:
        devices = jax.devices()[:1] if one_device else None
        _RUNS[key] = run_steps(load_recipe("tiny", [*SMALL, *overrides]), devices)
    return _RUNS[key]


# float32 tolerances, for two programs that compute the same sums in another order or grouping
# (sharded reductions, micro-batches, offloaded state). Unit roundoff u = 2^-24 = 6e-8. The
# longest reductions sum the 512 tokens of a batch (weight gradients, the mean loss) or d <= 128
# products; reordering a sum of n terms moves it by about sqrt(n) u times the sum of |terms|
# (n u at worst), 1.4e-6 for n = 512, and the 2-layer forward and backward chain about ten such
# reductions: sqrt(10) x 1.4e-6 = 4.4e-6 relative to the size of the terms, under RTOL = 1e-5.
# A gradient element can be a sum with cancellation, far smaller than its terms, so its absolute
# tolerance is RTOL times the largest gradient of its leaf (the scale of the per-token terms).
# Parameters: an Adam step moves each by lr m / (sqrt(v) + eps), whose relative error is about
# the gradients', so 3 steps at lr <= 3e-4 differ by ~3 x 3e-4 x 1e-5 = 1e-8; ATOL = 1e-5 also
# covers the parameters' own rounding (|p| < 1, ulp <= 6e-8) and is 30x below one lr-sized
# step, so any element updated wrongly still fails. (A gradient element within rounding of zero
# could flip its Adam direction: none is here; unused embedding rows get exactly zero.)
RTOL = 1e-5
ATOL = 1e-5


def assert_trees_close(actual: Any, desired: Any, rtol: float, atol: float, what: str) -> None:
    """Leafwise |actual - desired| <= atol + rtol |desired|, naming the leaf that differs."""
    flat = jax.tree_util.tree_leaves_with_path(desired)
    for (path, b), a in zip(flat, jax.tree.leaves(actual), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def assert_grads_close(actual: Any, desired: Any, rtol: float = RTOL) -> None:
    """Leafwise |actual - desired| <= rtol (|desired| + max |desired leaf|)."""
    flat = jax.tree_util.tree_leaves_with_path(desired)
    for (path, b), a in zip(flat, jax.tree.leaves(actual), strict=True):
        b = np.asarray(b)
        scale = float(np.abs(b).max())
        assert scale > 0, f"gradient {jax.tree_util.keystr(path)} is zero: nothing to compare"
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol * scale,
                                   err_msg=f"gradient {jax.tree_util.keystr(path)}")


def gaps(run: Run, base: Run) -> dict[str, float]:
    """Largest relative differences (gradients: relative to their leaf's largest magnitude)."""

    def worst(a, b, scale):
        return float(np.max(np.abs(np.asarray(a) - b) / scale(np.asarray(b))))

    def leafwise(tree_a, tree_b, scale):
        return max(worst(a, b, scale) for a, b in zip(jax.tree.leaves(tree_a),
                                                      jax.tree.leaves(tree_b), strict=True))

    return {"loss": worst(run.losses, base.losses, np.abs),
            "grad_norm": worst(run.grad_norms, base.grad_norms, np.abs),
            "grads": leafwise(run.grads, base.grads, lambda b: np.abs(b).max()),
            "params": leafwise(run.params, base.params, lambda b: np.maximum(np.abs(b), 1.0))}


def assert_same_run(run: Run, base: Run, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Losses, per-step gradient norms, gradients and final parameters of two float32 runs
    agree within the reordering error above."""
    print(gaps(run, base))
    assert base.losses[-1] != base.losses[0]  # the params moved, so equality means something
    np.testing.assert_allclose(run.losses, base.losses, rtol=rtol, atol=atol, err_msg="loss")
    np.testing.assert_allclose(run.grad_norms, base.grad_norms, rtol=rtol, err_msg="grad_norm")
    assert_grads_close(run.grads, base.grads, rtol)
    assert_trees_close(run.params, base.params, rtol, atol, "parameter")
