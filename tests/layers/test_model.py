"""The dense transformer: causality, exact parameter count, scan = loop.

Remat policies are checked against `none` in tests/parallel/test_offload.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.transformer import TransformerConfig

CFG = TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                        mlp_dim=64)


def test_causal_future_tokens_do_not_change_past_logits():
    model = CFG.build()
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 64)
    params = model.init(jax.random.key(1), tokens)
    logits, _ = model.apply(params, tokens)
    t = 11
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 64)
    logits2, _ = model.apply(params, changed)
    np.testing.assert_allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6, rtol=0)
    # ... and the change does reach later positions (so the check above can fail).
    assert float(jnp.max(jnp.abs(logits[:, t + 1:] - logits2[:, t + 1:]))) > 1e-3


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_matches_analytic(tie):
    cfg = TransformerConfig(vocab_size=64, num_layers=3, d_model=48, num_heads=6, num_kv_heads=3,
                            mlp_dim=80, tie_embeddings=tie)
    params = jax.eval_shape(cfg.build().init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == cfg.param_count()


def test_scan_and_loop_give_the_same_logits():
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
    scanned = CFG.build()
    params = scanned.init(jax.random.key(1), tokens)["params"]
    looped_cfg = TransformerConfig(**{**CFG.__dict__, "scan_layers": False})
    blocks = params["layers"]["block"]
    looped_params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(CFG.num_layers):
        looped_params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    a, _ = scanned.apply({"params": params}, tokens)
    b, _ = looped_cfg.build().apply({"params": looped_params}, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_head_config_is_explained():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        TransformerConfig(num_heads=4, num_kv_heads=3).build()
