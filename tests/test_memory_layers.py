"""Memory layers: exact parameter counts, value-read identities, sharded tables, training,
UltraMemV2's initialisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.layers.kernels.embedding_bag import embedding_bag
from mnemax.layers.memory import MemoryConfig, MemoryLayer, memory_param_count
from mnemax.layers.memory.initialization import synthetic_inputs, ultramemv2_init, weight_energy
from mnemax.layers.memory.retrieval import ProductKeyRetrieval
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
# ultramemv2_tiny's 64-wide pre-values and values would equal SMALL's d_model (no projection).
SMALL_ULTRAMEMV2 = ("model.memory.pre_value_dim=16", "model.memory.value_dim=16")


def small_memory_recipe(name, *overrides):
    every_block = name in ("ultramem_tiny", "memory_plus_tiny", "ultramemv2_tiny")
    layers = "model.memory.layers=0,1" if every_block else "model.memory.layers=1"
    extra = SMALL_ULTRAMEMV2 if name == "ultramemv2_tiny" else ()
    return load_recipe(name, [*SMALL, *SMALL_MEMORY, layers, *extra, *overrides])


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


@pytest.mark.parametrize("name", [*VARIANTS, "ultramemv2_tiny"])
def test_memory_variant_trains(name, tmp_path):
    recipe = small_memory_recipe(name, "run.steps=40", "model.memory.num_rows=1024",
                                 "model.memory.topk=8")
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    assert metrics[40]["loss"] < metrics[1]["loss"] - 1.5, (metrics[1]["loss"],
                                                           metrics[40]["loss"])
    assert metrics[40]["memory/usage"] > 0.01


# UltraMemV2's layout at a size where the statistics below are tight: h = 128, one head reading
# the top 16 of 4,096 slots, 32-wide pre-values and values, memory beside a 192-wide FFN in each
# of 4 blocks (k_inner = 1.5).
ULTRAMEMV2 = MemoryConfig(variant="peer", num_rows=64**2, num_heads=1, topk=16, key_dim=32,
                          tucker_rank=2, pre_value_dim=32, value_dim=32, peer_activation="none",
                          init="ultramemv2", layers=(0, 1, 2, 3), mode="parallel")
D_MODEL, NUM_LAYERS, FFN_HIDDEN = 128, 4, 192


@pytest.mark.parametrize("config", [
    ULTRAMEMV2,
    # Embedding values read through 4 expansion projections and a 32 -> 128 output projection,
    # all linears at std 0.02 (a model initialised at 0.02 rather than SmallInit).
    MemoryConfig(variant="ultramem", num_rows=64**2, num_heads=2, topk=8, key_dim=32,
                 tucker_rank=2, value_expansion=4, value_dim=32, init="ultramemv2",
                 init_linear_std=0.02, layers=(0, 1, 2, 3), mode="parallel"),
], ids=["peer", "ultramem"])
def test_ultramemv2_init_stds_and_output_variance(config):
    layer = MemoryLayer(config, num_layers=NUM_LAYERS, ffn_hidden_dim=FFN_HIDDEN)
    x = jax.random.normal(jax.random.key(0), (8, 256, D_MODEL))
    init, apply = jax.jit(layer.init), jax.jit(layer.apply)
    inits = [nn.unbox(init(jax.random.key(seed), x)) for seed in range(4)]
    p = inits[0]["params"]
    assert sum(leaf.size for leaf in jax.tree.leaves(p)) == memory_param_count(config, D_MODEL)

    # E_w: the softmax weights' sum of squares over a head's top-k, on the layer's own retrieval
    # (the paper's k (1 + sigma_s^2), measured as in its App. A.2).
    weights, _, _ = jax.jit(ProductKeyRetrieval(config).apply)({"params": p["retrieval"]},
                                                               synthetic_inputs(D_MODEL))
    energy = float(weight_energy(weights))
    assert 1 / config.topk < energy < 1.0
    s = config.linear_std(D_MODEL, D_MODEL)
    a = D_MODEL * s**2  # a linear's output variance on unit-variance inputs (paper: 0.4)
    target = a * a * FFN_HIDDEN * s**2 / (2 * NUM_LAYERS)  # Eq. 25 for linear std s
    if config.variant == "peer":
        # The paper's numbers: SmallInit linears, Eq. 25 and Eq. 26,
        # sigma_V^4 = 0.2 k_inner h / (n_head E_w d_prev d_v L).
        k_inner = FFN_HIDDEN / D_MODEL
        assert s == pytest.approx((2 / (5 * D_MODEL)) ** 0.5, rel=1e-12)
        assert target == pytest.approx(0.064 * k_inner / (2 * NUM_LAYERS), rel=1e-12)
        sigma_v = (0.2 * k_inner * D_MODEL / (1 * energy * 32 * 32 * NUM_LAYERS)) ** 0.25
        tables, linears = ("values", "expert_down"), ("pre_value_proj", "out")
    else:
        # Embedding values: E_w n_head sigma_V^2 (d_v s^2) (d_v s^2) = sigma_ffn^2.
        sigma_v = (target / (2 * energy * (32 * s**2) ** 2)) ** 0.5
        tables, linears = ("values",), ("value_projections", "out")
    stds = ultramemv2_init(config, D_MODEL, energy, NUM_LAYERS, FFN_HIDDEN)
    assert float(stds.value_std) == pytest.approx(sigma_v, rel=1e-5)
    assert stds.target_std**2 == pytest.approx(target, rel=1e-12)
    for name in tables:  # >= 131,072 draws: std error 0.2%
        assert float(jnp.std(p[name])) == pytest.approx(sigma_v, rel=0.015), name
    for leaf in (p["retrieval"]["query"], *(p[name] for name in linears)):  # >= 4,096 draws
        assert float(jnp.std(leaf)) == pytest.approx(s, rel=0.04)

    # Monte Carlo over 4 initialisations x 2,048 unit-variance tokens: the memory output has the
    # FFN's variance to within 10% (the spread over initialisations is about 7%, the token
    # noise of the mean about 1%).
    variances = [float(jnp.mean(apply(params, x)[0] ** 2)) for params in inits]
    assert np.mean(variances) == pytest.approx(target, rel=0.10), (variances, target)


def test_unknown_or_inapplicable_init_is_a_config_error():
    with pytest.raises(ConfigError, match=r"memory\.init='xavier' is not a known .*ultramemv2"):
        MemoryConfig(init="xavier").validate(64, 2)
    with pytest.raises(ConfigError, match=r"set memory\.peer_activation=none"):
        MemoryConfig(variant="peer", init="ultramemv2").validate(64, 2)
    with pytest.raises(ConfigError, match="memory_plus / gated=true is not covered"):
        load_recipe("memory_plus_tiny", ["model.memory.init=ultramemv2"]).model.build()
