"""Non-parameter model state (issue 11 item 7): a component registered from this test keeps a
per-channel bias in MODEL_STATE, records the batch mean of its input in STATE_STATS, and moves
the bias by 0.1 * sign(mean - bias) once per step. The sign makes the rule non-linear, so
"one update from all micro-batches" differs from averaging per-micro-batch updates."""

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers import axes
from mnemax.layers.components import MODEL_STATE, STATE_STATS, Component, registered
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.loop import _restore, train
from mnemax.trainer.recipe import recipe_to_dict
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL

STEP = 0.1


class _Biased(nn.Module):
    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        w = self.param("w", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         (axes.EMBED, axes.MLP)), (d, 16))
        v = self.param("v", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         (axes.MLP, axes.EMBED)), (16, d))
        bias = self.variable(MODEL_STATE, "bias", nn.with_logical_partitioning(
            nn.initializers.zeros, (axes.EMBED,)), jax.random.key(0), (d,), jnp.float32)
        self.put_variable(STATE_STATS, "mean", jnp.mean(x.astype(jnp.float32), axis=(0, 1)))
        return jax.nn.relu(x @ w.astype(x.dtype)) @ v.astype(x.dtype) + bias.value.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BiasFFN(Component):
    kind: ClassVar[str] = "ffn"
    name: ClassVar[str] = "bias_ffn"
    module_name: ClassVar[str] = "biased"

    @classmethod
    def for_block(cls, model, layer):
        return cls()

    def apply(self, ctx, x, positions, shared):
        return _Biased(name=self.module_name)(x), {}

    def param_count(self, ctx):
        return 2 * 16 * ctx.model.d_model

    def flops_per_token(self, ctx, seq_len):
        return 6.0 * self.param_count(ctx)

    def update_state(self, state, stats):
        return {"bias": state["bias"] + STEP * jnp.sign(stats["mean"] - state["bias"])}


def _batches(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 257, (16, 33), dtype=np.int32) for _ in range(n)]


def _run(*overrides, devices=None, steps=3):
    program = build_program(load_recipe("tiny", [*SMALL, *overrides]), devices)
    state = program.init(jax.random.key(0))
    losses = []
    for batch in _batches(steps):
        state, metrics = program.train_step(state, program.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return program, np.array(losses), jax.device_get(state)


def _bias(state, looped=False):
    if looped:
        return np.stack([state.model_state[f"layer_{i}"]["biased"]["bias"] for i in range(2)])
    return state.model_state["layers"]["block"]["biased"]["bias"]


def test_state_updates_once_per_step_outside_the_optimizer():
    with registered(BiasFFN):
        program, _, state = _run(devices=jax.devices()[:1])
        _, _, accum = _run("run.grad_accum=2", devices=jax.devices()[:1])
        _, _, looped = _run("model.scan_layers=false", devices=jax.devices()[:1])
    bias = _bias(state)
    # Three steps of +-0.1 from 0: every element is +-0.1 or +-0.3, per block.
    assert bias.shape == (2, 64)
    np.testing.assert_allclose(np.sort(np.unique(np.round(np.abs(bias), 6))), [0.1, 0.3])
    # One update from the statistics of both micro-batches, not two half-updates (which would
    # leave 0.0 wherever the two micro-batches' signs disagree).
    np.testing.assert_allclose(_bias(accum), bias, atol=1e-6)
    # Looped blocks (their own initial parameters, so other values) update their own state
    # once per step too.
    np.testing.assert_allclose(
        np.sort(np.unique(np.round(np.abs(_bias(looped, looped=True)), 6))), [0.1, 0.3])
    # Not a parameter: no gradient, no Adam moments, no weight decay.
    param_paths = [jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path(state.params)]
    assert any("biased" in p for p in param_paths)
    assert not any("bias'" in p for p in param_paths)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(state.opt_state)]
    assert not any("'bias'" in p for p in opt_paths)
    spec = program.state_shardings.model_state["layers"]["block"]["biased"]["bias"].spec
    assert all(entry is None for entry in spec)  # one device: nothing to split


def test_sharded_state_equals_one_device():
    with registered(BiasFFN):
        _, base_losses, base = _run(devices=jax.devices()[:1])
        program, losses, sharded = _run("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")
    # The batch mean is a cross-device sum (float32 rounding ~1e-7), far from any sign flip.
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_bias(sharded), _bias(base), atol=1e-6)
    # Laid out by the parameters' rules: `embed` over fsdp at ZeRO 3.
    spec = program.state_shardings.model_state["layers"]["block"]["biased"]["bias"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_state_is_checkpointed_and_old_checkpoints_restore_with_a_message(tmp_path, capsys):
    overrides = [*SMALL, "run.log_every=1"]
    with registered(BiasFFN):
        train(load_recipe("tiny", [*overrides, "run.steps=3"]), tmp_path / "straight")
        train(load_recipe("tiny", [*overrides, "run.steps=2"]), tmp_path / "resumed")
        train(load_recipe("tiny", [*overrides, "run.steps=3"]), tmp_path / "resumed")
        recipe = load_recipe("tiny", overrides)
        program = build_program(recipe)
        from mnemax.trainer.checkpoint import abstract_with_shardings

        target = abstract_with_shardings(program.abstract_state, program.state_shardings)
        states = {}
        for name in ("straight", "resumed"):
            ckpt = Checkpointer(tmp_path / name / "checkpoints", recipe.checkpoint)
            states[name] = jax.device_get(ckpt.restore(3, target)[0])
            ckpt.close()
        np.testing.assert_allclose(_bias(states["resumed"]), _bias(states["straight"]))
        assert np.abs(_bias(states["straight"])).max() == pytest.approx(0.3)

        # A checkpoint of the train state without `model_state` (as written before it existed)
        # restores its params and optimizer state; the model state starts from its initial
        # value, and a line says so.
        old = tmp_path / "old"
        ckpt = Checkpointer(old / "checkpoints", recipe.checkpoint)
        s = states["straight"]
        ckpt.save(3, {"step": s.step, "params": s.params, "opt_state": s.opt_state},
                  {"seed": 0}, recipe_to_dict(recipe))
        ckpt.close()
        capsys.readouterr()
        ckpt = Checkpointer(old / "checkpoints", recipe.checkpoint)
        restored, _, _ = _restore(program, ckpt, 3, recipe)
        ckpt.close()
    assert "has no model state" in capsys.readouterr().out
    np.testing.assert_array_equal(_bias(jax.device_get(restored)), 0.0)
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(s.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
