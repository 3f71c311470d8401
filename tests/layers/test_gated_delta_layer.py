"""The Gated DeltaNet layer and hybrid models: decoding, causality, windows, size, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.gated_delta import GatedDeltaConfig, GatedDeltaNet, init_cache
from mnemax.layers.transformer import TransformerConfig
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.loop import train
from tests.helpers import SMALL, read_metrics

CFG = GatedDeltaConfig(num_heads=2, num_value_heads=4, head_dim=16, value_head_dim=8,
                       chunk_size=8)


def test_decoding_token_by_token_equals_the_parallel_layer():
    layer = GatedDeltaNet(CFG)
    x = jax.random.normal(jax.random.key(0), (2, 21, 32))
    params = layer.init(jax.random.key(1), x)
    parallel, _ = layer.apply(params, x)
    cache = init_cache(CFG, batch=2)
    decode = jax.jit(layer.apply)  # one compile for the 21 steps
    steps = []
    for t in range(x.shape[1]):
        y, cache = decode(params, x[:, t:t + 1], cache)
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), parallel, atol=2e-5, rtol=1e-4)


def model(mixers, **kw):
    return TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                             mixers=mixers, gated_delta=GatedDeltaConfig(
                                 num_heads=2, head_dim=16, chunk_size=8), **kw)


@pytest.mark.parametrize("mixers", [("gdn",), ("gdn", "swa")])
def test_hybrid_is_causal_and_sized_as_computed(mixers):
    cfg = model(mixers, sliding_window=4)
    tokens = jax.random.randint(jax.random.key(0), (2, 20), 0, 64)
    params = cfg.build().init(jax.random.key(1), tokens)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count()
    logits, _ = cfg.build().apply(params, tokens)
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 5) % 64)
    logits2, _ = cfg.build().apply(params, changed)
    np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-5)
    assert float(jnp.max(jnp.abs(logits[:, t + 1:] - logits2[:, t + 1:]))) > 1e-4


def test_sliding_window_sees_exactly_its_window():
    cfg = TransformerConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                            mixers=("swa",), sliding_window=4)
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 64)
    params = cfg.build().init(jax.random.key(1), tokens)
    base, _ = cfg.build().apply(params, tokens)
    far, _ = cfg.build().apply(params, tokens.at[:, 10].set((tokens[0, 10] + 1) % 64))
    # Position 14 sees tokens 11..14 only; position 13 sees 10..13.
    np.testing.assert_allclose(far[:, 14], base[:, 14], atol=1e-6)
    assert float(jnp.max(jnp.abs(far[:, 13] - base[:, 13]))) > 1e-4


@pytest.mark.parametrize("name", ["gdn_tiny", "gdn_h1_tiny"])
def test_gated_delta_recipes_train(name, tmp_path):
    recipe = load_recipe(name, [*SMALL, "run.steps=40", "model.gated_delta.head_dim=16",
                                "model.gated_delta.chunk_size=16", "model.sliding_window=8"])
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    assert metrics[40]["loss"] < metrics[1]["loss"] - 1.5, (metrics[1]["loss"],
                                                           metrics[40]["loss"])
