"""Tensor (Megatron) and sequence parallelism over the `tensor` axis equal one-device training."""

import collections
import re

import jax
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.trainer.checkpoint import abstract_with_shardings
from mnemax.trainer.setup import build_program
from tests.helpers import small_memory_recipe
from tests.helpers.equivalence import assert_same_run, run_steps, small_run

# Plain tensor parallelism (data:4,tensor:2) is compiled by the collectives test below.
LAYOUTS = (
    ("strategy.mesh=data:2,fsdp:2,tensor:2", "strategy.zero_stage=2",
     "strategy.sequence_parallel=true"),
    ("strategy.mesh=data:2,fsdp:2,tensor:2", "strategy.zero_stage=3"),
)


def test_tensor_layouts_match_one_device():
    base = small_run(one_device=True)
    for overrides in LAYOUTS:
        run = small_run(*overrides)
        assert_same_run(run, base)
    # The last layout really splits: heads and MLP hidden over tensor (2), embed over fsdp (2).
    params = run.state.params
    block = params["layers"]["block"]
    assert block["attn"]["q"].addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert block["mlp"]["down"].addressable_shards[0].data.shape == (2, 64, 32)
    assert params["embedding"].addressable_shards[0].data.shape == (160, 32)


def test_memory_model_with_tensor_and_sequence_parallelism():
    # The value table is split over data (dim sharding, by shard_map) beside the tensor axis.
    base = run_steps(small_memory_recipe("pkm_tiny"), jax.devices()[:1])
    assert_same_run(run_steps(small_memory_recipe(
        "pkm_tiny", "strategy.mesh=data:4,tensor:2", "strategy.sequence_parallel=true")), base)


def _collectives(recipe) -> tuple[collections.Counter, list[str]]:
    program = build_program(recipe)
    state = abstract_with_shardings(program.abstract_state, program.state_shardings)
    data = recipe.data
    batch = jax.ShapeDtypeStruct((data.global_batch, data.seq_len + 1), np.int32,
                                 sharding=program.batch_sharding)
    hlo = program.train_step.lower(state, batch).compile().as_text()
    pattern = r"= (\S+) (all-gather|all-reduce|reduce-scatter|all-to-all)\("
    found = re.findall(pattern, hlo)
    return collections.Counter(op for _, op in found), [s for s, op in found if op == "all-gather"]


def test_no_parameter_is_gathered_and_sequence_parallel_gathers_activations(small_recipe):
    ops, _ = _collectives(small_recipe("strategy.mesh=data:4,tensor:2"))
    # Megatron layout: partial sums are reduced, nothing is all-gathered (the vocab-parallel
    # embedding looks up its own rows instead of gathering the 320 x 64 table).
    assert ops["all-reduce"] > 0 and ops["all-gather"] == 0
    ops, gathered = _collectives(small_recipe("strategy.mesh=data:4,tensor:2",
                                              "strategy.sequence_parallel=true"))
    # Sequence parallelism gathers activations [batch 4 per data shard, time, ...] only.
    assert ops["all-gather"] > 0
    assert all(shape.split("[")[1].startswith("4,") for shape in gathered), gathered


def test_tensor_degree_that_does_not_divide_kv_heads(small_recipe):
    with pytest.raises(ConfigError, match=r"size 2 is not divisible by 4 \(mesh axes tensor\)"
                                          r".*Tensor parallelism splits attention heads"):
        build_program(small_recipe("strategy.mesh=data:2,tensor:4"))


def test_seq_axis_is_refused_with_the_alternative(small_recipe):
    with pytest.raises(ConfigError, match=r"'seq' axis is not supported yet.*data, fsdp, "
                                          r"tensor and expert"):
        build_program(small_recipe("strategy.mesh=data:2,seq:4"))
