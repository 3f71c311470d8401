"""`mnemax generate`: sample a continuation of a prompt from a run's newest checkpoint.

The whole sampling loop is one jitted program over a buffer of `prompt + max_tokens` ids (one
compile per prompt length): with per-block caches (`mnemax.layers.decoding.decode_step`, one
token per step, the prompt included) when every mixer has one, else the full forward over the
buffer at each step (MoBA, NSA). Step t's random key is `fold_in(key(seed), t)`, so a seed
gives the same text on either path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from mnemax.errors import ConfigError
from mnemax.layers.decoding import decode_step, full_forward_logits, has_cache, init_caches
from mnemax.layers.transformer import TransformerConfig
from mnemax.trainer.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    max_tokens: int = 128  # tokens generated after the prompt (fewer when eos comes first)
    temperature: float = 1.0  # logits are divided by it before sampling
    top_k: int | None = None  # sample among the k most likely ids; None = all
    greedy: bool = False  # the most likely id every step (temperature and top_k unused)
    seed: int = 0  # random seed of the sampling

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens} must be >= 1")
        if not self.greedy and not self.temperature > 0:
            raise ConfigError(f"--temperature {self.temperature} must be > 0; use --greedy "
                              "for the most likely token every step")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k {self.top_k} must be >= 1 (or leave it out: all ids)")


def sample_next(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Logits `[batch, vocab]` fp32 -> ids `[batch]` int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_ids(cfg: TransformerConfig, variables: dict[str, Any], prompt: Sequence[int],
                 sampling: Sampling, *, vocab_limit: int | None = None,
                 compute_dtype: Any = jnp.float32) -> np.ndarray:
    """The `sampling.max_tokens` ids `[max_tokens]` that follow `prompt` (batch of one).

    `vocab_limit`: ids >= it (output classes the tokenizer has no token for) are never chosen.
    """
    sampling.validate()
    if not prompt:
        raise ConfigError("the prompt has no tokens: give a non-empty --prompt")
    prompt_len, total = len(prompt), len(prompt) + sampling.max_tokens
    limit = min(vocab_limit or cfg.vocab_size, cfg.vocab_size)
    cached = has_cache(cfg)

    def run(variables, buffer, key):
        variables = jax.tree.map(
            lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            variables)

        def choose(logits, t):  # logits `[batch, vocab]` at position t -> the id at t + 1
            return sample_next(logits[:, :limit], jax.random.fold_in(key, t), sampling)

        if cached:
            def step(carry, t):
                buffer, caches = carry
                token = jax.lax.dynamic_slice_in_dim(buffer, t, 1, axis=1)
                logits, caches = decode_step(cfg, variables, token, t, caches)
                # Inside the prompt, the next id is the prompt's: the step only fills caches.
                nxt = jnp.where(t + 1 < prompt_len, buffer[:, t + 1], choose(logits[:, 0], t))
                buffer = jax.lax.dynamic_update_slice_in_dim(buffer, nxt[:, None], t + 1, 1)
                return (buffer, caches), None

            caches = init_caches(cfg, buffer.shape[0], total, compute_dtype)
            (buffer, _), _ = jax.lax.scan(step, (buffer, caches), jnp.arange(total - 1))
            return buffer

        def step(t, buffer):
            logits = full_forward_logits(cfg, variables, buffer)
            nxt = choose(jax.lax.dynamic_index_in_dim(logits, t, 1, keepdims=False), t)
            return jax.lax.dynamic_update_slice_in_dim(buffer, nxt[:, None], t + 1, 1)

        return jax.lax.fori_loop(prompt_len - 1, total - 1, step, buffer)

    buffer = jnp.zeros((1, total), jnp.int32).at[0, :prompt_len].set(jnp.asarray(prompt))
    out = jax.jit(run)(variables, buffer, jax.random.key(sampling.seed))
    return np.asarray(jax.device_get(out))[0, prompt_len:]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids a document starting with `text` begins with: bos first when the tokenizer has
    one, else eos (training rows pack documents each ended by eos, so eos is what precedes a
    document's first token)."""
    bos = getattr(tokenizer, "bos_id", None)
    return [tokenizer.eos_id if bos is None else bos, *tokenizer.encode(text)]


def generate(recipe: Recipe, run_dir: epath.PathLike, prompt: str,
             sampling: Sampling) -> str:
    """The prompt followed by the sampled continuation (cut at the first eos), as text."""
    from mnemax.launch.run_artifacts import restore_newest
    from mnemax.trainer.run_tokenizer import run_tokenizer
    from mnemax.trainer.setup import COMPUTE_DTYPES

    sampling.validate()
    tokenizer = run_tokenizer(recipe.data)
    model = restore_newest(recipe, run_dir)
    ids = generate_ids(recipe.model, model.variables, prompt_ids(tokenizer, prompt), sampling,
                       vocab_limit=tokenizer.vocab_size,
                       compute_dtype=COMPUTE_DTYPES[recipe.run.compute_dtype])
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    return prompt + tokenizer.decode(ids[:ends[0]] if ends.size else ids)
