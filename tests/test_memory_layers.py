"""Memory layers: exact parameter counts, value-read identities, sharded tables, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.kernels.embedding_bag import embedding_bag
from mnemax.layers.memory import MemoryConfig, MemoryLayer
from mnemax.layers.memory.values import read_expanded_values
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.loop import train
from mnemax.trainer.optimizer import OptimizerConfig, _param_groups
from mnemax.trainer.setup import build_program
from tests.conftest import SMALL
from tests.test_train import read_metrics

VARIANTS = ("pkm_tiny", "memory_plus_tiny", "ultramem_tiny", "peer_tiny")
# Shrinks a memory recipe's memory to CPU-test size (on top of SMALL's 2 x 64 model).
SMALL_MEMORY = ("model.memory.num_rows=256", "model.memory.topk=4", "model.memory.key_dim=16",
                "model.memory.num_heads=2")


def small_memory_recipe(name, *overrides):
    layers = "model.memory.layers=0,1" if name in ("ultramem_tiny", "memory_plus_tiny") else \
        "model.memory.layers=1"
    return load_recipe(name, [*SMALL, *SMALL_MEMORY, layers, *overrides])


@pytest.mark.parametrize("name", VARIANTS)
def test_param_count_and_aux(name):
    recipe = small_memory_recipe(name)
    model = recipe.model.build()
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 257)
    params = model.init(jax.random.key(1), tokens)
    assert sum(x.size for x in jax.tree.leaves(params)) == recipe.model.param_count()
    logits, aux = model.apply(params, tokens)
    assert logits.shape == (2, 16, recipe.model.vocab_size)
    # 32 tokens x 2 heads x top-4 reads over 256 slots: some, not all, slots are used.
    assert 0.0 < float(aux["memory/usage"]) < 1.0
    assert 0.0 < float(aux["memory/weight_entropy"]) <= 1.0


def test_implicit_value_expansion_equals_the_explicit_virtual_table():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)  # 8 physical rows
    proj = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)  # 4 projections -> 32 virtual
    virtual = jnp.einsum("pd,edv->pev", table, proj).reshape(32, 5)
    idx = jnp.asarray(rng.integers(0, 32, (10, 7)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(10, 7)), jnp.float32)
    np.testing.assert_allclose(read_expanded_values(table, proj, idx, w),
                               embedding_bag(virtual, idx, w, impl="reference"), atol=1e-5)


def test_tucker_scores_are_the_core_scores_of_the_returned_slots():
    cfg = MemoryConfig(variant="ultramem", num_rows=64, num_heads=1, topk=4, key_dim=8,
                       tucker_rank=2, query_norm="none")
    layer = MemoryLayer(cfg)
    x = jax.random.normal(jax.random.key(0), (1, 5, 16))
    params = nn.unbox(layer.init(jax.random.key(1), x))
    p = params["params"]["retrieval"]
    _, indices, scores = _retrieval(layer, params, x)
    q = jnp.einsum("btd,dhk->bthk", x, p["query"]).reshape(1, 5, 1, 2, 2, 4)
    s_row = jnp.einsum("btrd,nd->btrn", q[:, :, 0, 0], p["subkeys"][0, 0])
    s_col = jnp.einsum("btrd,nd->btrn", q[:, :, 0, 1], p["subkeys"][0, 1])
    full = jnp.einsum("xtan,ac,xtcm->xtnm", s_row, p["core"][0], s_col).reshape(1, 5, 64)
    expected = jnp.take_along_axis(full, indices[:, :, 0], axis=-1)
    np.testing.assert_allclose(scores[:, :, 0], expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(scores[..., :-1] >= scores[..., 1:]))


def _retrieval(layer, params, x):
    from mnemax.layers.memory.retrieval import ProductKeyRetrieval

    return ProductKeyRetrieval(layer.config).apply({"params": params["params"]["retrieval"]}, x)


@pytest.mark.parametrize("sharding", ["dim", "rows"])
def test_sharded_value_table_equals_unsharded(sharding):
    def run(recipe, devices=None):
        program = build_program(recipe, devices)
        state = program.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(2):
            batch = rng.integers(0, 257, (16, recipe.data.seq_len + 1), dtype=np.int32)
            state, metrics = program.train_step(state, program.global_batch(batch))
            losses.append(float(metrics["loss"]))
        return losses, state

    base = small_memory_recipe("memory_plus_tiny", "model.memory.value_dim=64")
    ref_losses, ref_state = run(base, jax.devices()[:1])
    losses, state = run(small_memory_recipe(
        "memory_plus_tiny", "model.memory.value_dim=64", "strategy.mesh=data:8",
        f"strategy.memory_sharding={sharding}"))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    values = state.params["memory_values"]
    shard = values.addressable_shards[0].data.shape
    assert shard == ((256, 8) if sharding == "dim" else (32, 64))  # no device holds it whole
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(ref_state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_value_tables_form_their_own_optimizer_group():
    params = {"layer_1": {"memory": {"values": 0, "gate": 0}}, "memory_values": 0,
              "layer_0": {"mlp": {"down": 0}, "memory": {"expert_down": 0}}}
    labels = _param_groups(OptimizerConfig())(params)
    assert labels["memory_values"] == "sparse"
    assert labels["layer_1"]["memory"] == {"values": "sparse", "gate": "dense"}
    assert labels["layer_0"] == {"mlp": {"down": "dense"}, "memory": {"expert_down": "sparse"}}


@pytest.mark.parametrize("name", VARIANTS)
def test_memory_variant_trains(name, tmp_path):
    recipe = small_memory_recipe(name, "run.steps=40", "model.memory.num_rows=1024",
                                 "model.memory.topk=8")
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    assert metrics[40]["loss"] < metrics[1]["loss"] - 1.5, (metrics[1]["loss"],
                                                           metrics[40]["loss"])
    assert metrics[40]["memory/usage"] > 0.01
