"""Model-level decoding (`mnemax.layers.decoding`): cached steps equal the full forward, and the
sampling loop (`mnemax.launch.generate`) equals an argmax loop over the full forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.launch.generate import Sampling, generate_ids
from mnemax.layers import decoding
from mnemax.layers.gated_delta import GatedDeltaConfig
from mnemax.layers.sparse_attention.config import MoBAConfig, SparseAttentionConfig
from mnemax.layers.transformer import TransformerConfig

VOCAB, T = 64, 12


def model(**kw) -> TransformerConfig:
    """A 2-block model with GQA (4 query heads, 2 kv heads)."""
    base = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                mlp_dim=64)
    return TransformerConfig(**{**base, **kw})


def random_variables(cfg: TransformerConfig, seed: int) -> dict:
    """The model's variables drawn with numpy (flax's init compiles one program per
    initializer: seconds). std 0.3, not init_std's 0.02, so attention weights are far from
    uniform: a cache that served a wrong key, position or window moves the logits by O(0.1),
    not by O(1e-4). RMSNorm scales are 1 + N(0, 0.1^2)."""
    shapes = nn.unbox(jax.eval_shape(cfg.build().init, jax.random.key(0),
                                     jnp.zeros((1, 4), jnp.int32)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        return 1 + 0.1 * noise if path[-1].key == "scale" else 0.3 * noise

    return jax.tree_util.tree_map_with_path(draw, shapes)


# gdn_h1 shrunk: Gated DeltaNet blocks alternating with sliding-window attention (window 4, so
# 12 tokens cross it), as gdn_h1_tiny; and a dense model whose blocks nn.scan stacks.
CACHED = {
    "dense_scanned": model(),
    "gdn_h1": model(mixers=("gdn", "swa"), sliding_window=4,
                    gated_delta=GatedDeltaConfig(num_heads=2, head_dim=16, chunk_size=8)),
}


def forward(cfg, variables, tokens):
    """The full forward, jitted (eager Gated DeltaNet's chunked form takes seconds)."""
    return jax.jit(lambda v, t: decoding.full_forward_logits(cfg, v, t))(variables, tokens)


@pytest.mark.parametrize("name", sorted(CACHED))
def test_cached_decode_token_by_token_equals_the_full_forward(name):
    cfg = CACHED[name]
    assert decoding.has_cache(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, T)), jnp.int32)
    variables = random_variables(cfg, seed=1)
    full = forward(cfg, variables, tokens)

    step = jax.jit(lambda v, tok, t, c: decoding.decode_step(cfg, v, tok, t, c))

    def decode(prefill: int) -> jax.Array:
        """Logits of all T tokens: `prefill` tokens in one call, then one token per call."""
        caches = decoding.init_caches(cfg, batch=2, max_len=T)
        logits, caches = step(variables, tokens[:, :prefill], 0, caches)
        out = [logits]
        for t in range(prefill, T):
            logits, caches = step(variables, tokens[:, t:t + 1], t, caches)
            out.append(logits)
        return jnp.concatenate(out, 1)

    # fp32 on both sides; they differ only in summation order (the softmax over T cached keys
    # vs the masked full rows; GDN's recurrence vs its chunked form). Each logit passes ~10
    # reductions of <= 64 terms of O(1) values: |error| <= 10 x 64 x 2^-24 x O(1) ~ 4e-5;
    # the logits are O(1) (params of std 0.3), so a wrong cache moves them by >> 1e-3.
    np.testing.assert_allclose(decode(prefill=1), full, atol=4e-5, rtol=0)
    if name == "gdn_h1":  # a 7-token prefill: the chunk path of both kinds of cache (KV, GDN)
        np.testing.assert_allclose(decode(prefill=7), full, atol=4e-5, rtol=0)
    assert float(jnp.std(full)) > 0.1  # the logits are not near-constant


def is_greedy(cfg, variables, ids, prompt_len, limit) -> bool:
    """Independent greedy check over the unpadded full forward: every generated id is the
    argmax (below `limit`) of the logits at the position before it. One forward serves all
    positions: the model is causal (tests/layers/test_gated_delta_layer.py), so the logits at
    t over the whole sequence are those over its first t + 1 ids, as in an argmax loop."""
    logits = forward(cfg, variables, jnp.asarray([ids]))[0, :, :limit]
    chosen = jnp.argmax(logits[prompt_len - 1:-1], axis=-1)
    return chosen.tolist() == list(ids[prompt_len:])


def test_greedy_generation_without_a_cache_equals_an_argmax_loop_over_the_full_forward():
    """MoBA has no cache: the sampling loop recomputes the padded buffer each step (the causal
    mask keeps the zeros after the current token out of its logits). The cached loop is
    checked the same way through `mnemax generate` (tests/cli/test_generate_export.py)."""
    cfg = model(mixers=("moba",), sparse_attention=SparseAttentionConfig(
        moba=MoBAConfig(block_size=4, topk=1)))
    assert not decoding.has_cache(cfg)
    prompt = [3, 17, 42, 5]
    variables = random_variables(cfg, seed=2)
    got = generate_ids(cfg, variables, prompt, Sampling(max_tokens=6, greedy=True),
                       vocab_limit=50)
    assert is_greedy(cfg, variables, [*prompt, *got.tolist()], len(prompt), limit=50)
    assert got.max() < 50  # ids the tokenizer has no token for are never chosen
