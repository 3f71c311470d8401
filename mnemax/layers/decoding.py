"""Decoding a `Transformer` one step at a time: per-block caches where the mixers have them.

`decode_step` runs the model's blocks on new tokens `[batch, t]` that continue the tokens the
caches hold, each block's mixer through its `decode` (attention: a KV cache; Gated DeltaNet:
its conv history and recurrent state), the FFNs as in the full forward (they act on each token
alone). Its logits equal the full forward's at those positions. A model with a mixer that has
no cache (`Component.init_cache` is None: MoBA, NSA) decodes with `full_forward_logits` over a
fixed-length buffer instead: causal masking makes the tokens after the current one harmless,
so one compiled forward serves every step.

The parameters are the ones `Transformer.init` makes; blocks stacked by `nn.scan` are sliced
out of the stacked tree one layer at a time, so a checkpoint decodes as it was trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers.components import STATE_STATS
from mnemax.layers.norms import RMSNorm
from mnemax.layers.transformer import DecoderBlock, TransformerConfig

Caches = tuple[Any, ...]  # one cache per block


def has_cache(cfg: TransformerConfig) -> bool:
    """Whether every block's mixer has a decoding cache (else: `full_forward_logits`)."""
    return all(cfg.mixer_component(i).init_cache(cfg.block_context(i), 1, 1) is not None
               for i in range(cfg.num_layers))


def init_caches(cfg: TransformerConfig, batch: int, max_len: int,
                dtype: Any = jnp.float32) -> Caches:
    """Empty caches of every block for `batch` sequences of up to `max_len` tokens."""
    return tuple(cfg.mixer_component(i).init_cache(cfg.block_context(i), batch, max_len, dtype)
                 for i in range(cfg.num_layers))


def _scanned(cfg: TransformerConfig) -> bool:
    return cfg.scan_layers and cfg.uniform_blocks  # as Transformer.__call__ decides


def block_variables(cfg: TransformerConfig, variables: dict[str, Any],
                    layer: int) -> dict[str, Any]:
    """The variables (params, model state) of block `layer` out of the model's variables."""
    out = {}
    for collection, tree in variables.items():
        if _scanned(cfg):
            if "layers" in tree:
                out[collection] = jax.tree.map(lambda a: a[layer], tree["layers"]["block"])
        elif f"layer_{layer}" in tree:
            out[collection] = tree[f"layer_{layer}"]
    return out


def decode_step(cfg: TransformerConfig, variables: dict[str, Any], tokens: jax.Array,
                start: jax.Array | int, caches: Caches) -> tuple[jax.Array, Caches]:
    """Tokens `[batch, t]` int32 at positions `start .. start + t - 1` -> (logits
    `[batch, t, vocab]` fp32, the caches holding them too). The compute dtype is the
    parameters' (as `Transformer`)."""
    variables = nn.unbox(variables)
    params = variables["params"]
    embedding = params["embedding"]
    x = jnp.take(embedding, tokens, axis=0)
    positions = jnp.asarray(start, jnp.int32) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    shared = {p.name: params[p.name] for p in cfg.shared_params()}
    new_caches = []
    for layer in range(cfg.num_layers):
        (x, _, cache), _ = DecoderBlock(cfg, layer).apply(
            block_variables(cfg, variables, layer), x, positions, shared, caches[layer],
            mutable=[STATE_STATS])
        new_caches.append(cache)
    x = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, x)
    unembed = embedding.T if cfg.tie_embeddings else params["unembed"]
    logits = jnp.einsum("bte,ev->btv", x, unembed.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    return logits, tuple(new_caches)


def full_forward_logits(cfg: TransformerConfig, variables: dict[str, Any],
                        tokens: jax.Array) -> jax.Array:
    """The model's fp32 logits `[batch, time, vocab]` over all of `tokens` `[batch, time]`
    (materialised even when the config trains with factored logits)."""
    model = dataclasses.replace(cfg, factored_logits=False).build()
    (logits, _), _ = model.apply(variables, tokens, mutable=[STATE_STATS])
    return logits
