"""Top-k routing and the router's balancing terms, as pure functions of fp32 logits.

Shapes: T tokens, E experts, k experts per token. Everything here is fp32: the top-k choice and
the exponentials of the losses are where low precision changes which experts a token gets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mnemax.layers.moe.config import MoEConfig


class Routing(NamedTuple):
    """The router's decision for T tokens."""

    probs: jax.Array  # [T, E] the distribution P of Switch's balance loss (rows sum to 1)
    expert_index: jax.Array  # [T, k] int32, chosen experts, best first
    weights: jax.Array  # [T, k] fp32, the gate value of each chosen expert


def route(logits: jax.Array, config: MoEConfig, bias: jax.Array | None = None) -> Routing:
    """Chooses k experts per token from `logits` [T, E] (fp32).

    softmax: p = softmax(logits); the k largest p are chosen and weigh the experts (Switch
    Eq. 1-2; Mixtral renormalises them). sigmoid (DeepSeek-V3 Eq. 13-16): s = sigmoid(logits);
    the k largest s + b are chosen (b the balancing `bias` [E], outside the gradient), and the
    chosen s, without b, weigh the experts, renormalised to sum 1 (its Eq. 13). Its balance-loss
    distribution is s / sum_e s (its Eq. 19).
    """
    if config.router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        _, expert_index = jax.lax.top_k(probs, config.topk)
        scores = probs
    else:
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        select = scores if bias is None else scores + jax.lax.stop_gradient(bias)
        _, expert_index = jax.lax.top_k(select, config.topk)
    weights = jnp.take_along_axis(scores, expert_index, axis=-1)
    if config.normalizes:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(probs, expert_index.astype(jnp.int32), weights)


def expert_counts(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert (before any capacity drop): [T, k] -> [E] fp32."""
    return jnp.zeros((num_experts,), jnp.float32).at[expert_index.reshape(-1)].add(1.0)


def load_balance_loss(probs: jax.Array, counts: jax.Array, topk: int) -> jax.Array:
    """Switch's auxiliary loss (Fedus et al. 2021, Eq. 4-6), unweighted: E * sum_e f_e P_e, with
    f_e = counts_e / (T k) the fraction of the T k routed (token, slot) pairs that go to expert e
    and P_e the mean over tokens of `probs` [T, E]. 1 at a uniform router with a balanced load;
    f carries no gradient (it is a count), P does."""
    num_tokens, num_experts = probs.shape
    fraction = counts / (num_tokens * topk)
    return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss (Zoph et al. 2022, Eq. 5), unweighted: the mean over tokens of
    logsumexp(logits)^2, which keeps the logits small enough for fp32 softmax/top-k to be
    stable. `logits` [T, E]."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def max_load(counts: jax.Array) -> jax.Array:
    """max_e counts_e / mean_e counts_e: 1 when balanced, E when one expert gets every token."""
    return jnp.max(counts) / jnp.mean(counts)


def balanced_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's bias update (Sec. 2.1.2): b_e += gamma * sign(mean_load - load_e), so an
    overloaded expert is chosen less and an underloaded one more. `counts` [E] are the step's
    per-expert loads (any scale: only their order against the mean matters)."""
    return bias + rate * jnp.sign(jnp.mean(counts) - counts)
