"""Sharded training equals unsharded training; bad meshes fail early with clear messages."""

import jax
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.trainer.setup import build_program


def _run(recipe, devices=None, steps=3):
    program = build_program(recipe, devices)
    state = program.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        batch = rng.integers(0, 257, (recipe.data.global_batch, recipe.data.seq_len + 1),
                             dtype=np.int32)
        state, metrics = program.train_step(state, program.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def test_data_and_fsdp_meshes_match_one_device(small_recipe):
    base_losses, base_params, _ = _run(small_recipe(), jax.devices()[:1])
    assert base_losses[-1] != base_losses[0]  # the params moved, so equality below means something
    for overrides in (("strategy.mesh=data:8",),
                      ("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")):
        losses, params, state = _run(small_recipe(*overrides))
        np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # ZeRO-3 really shards: the q projection's embed dim is split 4 ways over fsdp.
    q = state.params["layers"]["block"]["attn"]["q"]
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 4


def test_gradient_accumulation_matches_one_big_batch(small_recipe):
    one, params_one, _ = _run(small_recipe("strategy.mesh=data:8"))
    accum, params_accum, _ = _run(small_recipe("strategy.mesh=data:8", "run.grad_accum=2"))
    np.testing.assert_allclose(accum, one, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params_accum), jax.tree.leaves(params_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_indivisible_parameter_dimension_names_both_numbers(small_recipe):
    recipe = small_recipe("model.d_model=60", "model.head_dim=16",
                          "strategy.mesh=fsdp:8", "strategy.zero_stage=3")
    with pytest.raises(ConfigError, match=r"size 60 is not divisible by 8 \(mesh axes fsdp\)"):
        build_program(recipe)


def test_indivisible_batch_names_both_numbers(small_recipe):
    with pytest.raises(ConfigError, match=r"12 sequences .* not divisible by the 8 data-parallel"):
        build_program(small_recipe("data.global_batch=12", "strategy.mesh=data:8"))


def test_mesh_that_does_not_match_device_count(small_recipe):
    with pytest.raises(ConfigError, match="needs 6 devices but 8 are present"):
        build_program(small_recipe("strategy.mesh=data:2,fsdp:3"))
