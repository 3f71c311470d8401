"""UltraMemV2's initialisation of a memory layer.

Huang et al., "UltraMemV2: Memory Networks Scaling to 120B Parameters with Superior Long-Context
Learning" (arXiv 2508.18756, 2025), Sec. 3.5 and Appendix A: all parameters are drawn from normal
distributions; the linear layers share one std (the model's, SmallInit sqrt(2 / (5 h)) in the
paper, Nguyen & Salazar 2019), and the std sigma_V of the values and pre-values is chosen so that
at init "the output variance of each UltraMem-V2 layer sigma_mem [equals] that of the FFN
sigma_ffn" (App. A.3). With h the hidden size, L the number of layers, k_inner the FFN width over
h, k the top-k, n_head the heads, d_prev / d_v the pre-value / value widths and sigma_s the std of
the top-k scores (calibrated to mean 1), the paper writes:

    Eq. 22   sigma_mem^2 = 0.16 (1 + sigma_s^2) sigma_V^4 d_prev k n_head d_v / h
    Eq. 25   sigma_ffn^2 = 0.064 k_inner / (2 L)
    Eq. 26   0.2 k_inner h / (k n_head (1 + sigma_s^2) d_prev d_v L)

Eq. 22 = Eq. 25 makes Eq. 26 sigma_V^4 (the extracted text prints its left side as sigma_V^2;
the two equations it is derived from fix the power, and we follow them).

The constants come from a linear std s with h s^2 = 0.4: a linear layer maps a unit-variance
input to variance a = h s^2. We keep the derivation and let s be any std (`linear_std`):

    sigma_ffn^2 = a^2 * (k_inner h) s^2 / (2 L)          SwiGLU inner a * a (App. A.3 takes
                                                          E[swish(g)^2] ~ Var g from a truncated
                                                          normal), down projection s / sqrt(2L)
    sigma_mem^2 = a_pre * E_w n_head * d_prev * sigma_V^4 * b            (PEER values, Eq. 22)

with a_pre = a after the pre-value projection (1 without one), b = d_v s^2 for the value
projection (1 without one). For s^2 = 0.4 / h these are Eq. 25, 22 and 26 exactly.

Where mnemax differs from the paper, and what we do instead (derived, not quoted):
- Slot weights. UltraMemV2 multiplies by the raw top-k scores, tuned (through the query and key
  norms) to mean 1, so a head's k weights have E[sum_j s_j^2] = k (1 + sigma_s^2). mnemax's
  weights are a softmax over the top-k scores; we use their own E_w = E[sum_j w_j^2] per head,
  measured as the paper measures sigma_s (App. A.2): random unit-variance inputs through the
  layer's own retrieval, at init (`weight_energy`). The keys keep their default init (a softmax
  needs no score calibration).
- Embedding values (pkm, ultramem): one factor sigma_V^2 instead of the pre-value dot product,
  sigma_mem^2 = E_w n_head sigma_V^2 * b, with b = d_v s^2 for the one linear that follows the
  read (UltraMem's expansion projections W_p `[d_v, D]`, or the output projection when
  d_v != D; 1 without either).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers.memory.config import MemoryConfig
from mnemax.layers.mlp import swiglu_hidden_dim


@dataclasses.dataclass(frozen=True)
class UltraMemV2Init:
    """The stds UltraMemV2's scheme gives one memory layer, and the quantities behind them
    (Python floats, or traced scalars when `weight_energy` is one)."""

    linear_std: float  # every linear: query, pre-value, expansion and value projections
    value_std: float | jax.Array  # sigma_V: values and (PEER) pre-values
    target_std: float  # sigma_ffn: the FFN output std the memory output matches (Eq. 25)
    weight_energy: float | jax.Array  # E_w = E[sum_j w_j^2] over one head's top-k slots


def ffn_output_variance(d_model: int, ffn_hidden_dim: int, num_layers: int,
                        linear_std: float) -> float:
    """sigma_ffn^2 of a SwiGLU FFN at init (UltraMemV2 App. A.3, Eq. 25, for any linear std).

    Gate and up projections of std `linear_std` give variance a = d_model * linear_std^2; the
    inner activation has variance a^2; the down projection has std linear_std / sqrt(2 L).
    With linear_std^2 = 0.4 / d_model this is the paper's 0.064 k_inner / (2 L).
    """
    a = d_model * linear_std**2
    return a * a * ffn_hidden_dim * linear_std**2 / (2 * num_layers)


def default_ffn_hidden_dim(config: MemoryConfig, d_model: int) -> int:
    """Width of the FFN a memory is matched to when the model does not say: Llama's SwiGLU width
    of `d_model` (the FFN a `replace` memory replaces), times `ffn_ratio` in `parallel` mode."""
    hidden = swiglu_hidden_dim(d_model)
    return max(1, round(hidden * config.ffn_ratio)) if config.mode == "parallel" else hidden


def synthetic_inputs(d_model: int, tokens: int = 2048, dtype=jnp.float32) -> jax.Array:
    """`[1, tokens, d_model]` draws of N(0, 1), what the pre-FFN RMSNorm feeds a memory at init;
    a fixed key, so the measurement below can be repeated outside the layer."""
    return jax.random.normal(jax.random.key(0), (1, tokens, d_model), dtype)


def weight_energy(weights: jax.Array) -> jax.Array:
    """E_w = E[sum_j w_j^2]: slot weights `[..., heads, k]` squared and summed over a head's
    top-k, averaged over tokens and heads. In [1/k, 1]: 1/k for uniform weights, 1 when one
    slot takes all. The layer measures it on `synthetic_inputs` through its own retrieval at
    init, as UltraMemV2 measures sigma_s on random data (App. A.2)."""
    w = weights.astype(jnp.float32)
    return jnp.mean(jnp.sum(w * w, axis=-1))


def ultramemv2_init(config: MemoryConfig, d_model: int, energy: float | jax.Array,
                    num_layers: int | None = None,
                    ffn_hidden_dim: int | None = None) -> UltraMemV2Init:
    """UltraMemV2's stds for one memory layer of `config` in a model of width `d_model`, whose
    retrieval gives slot weights of energy `energy` (`weight_energy`).

    `num_layers` (L of Eq. 25) defaults to the number of memory layers (UltraMemV2 puts one in
    every block); `ffn_hidden_dim` (k_inner * h) to `default_ffn_hidden_dim`.
    """
    num_layers = num_layers or max(len(config.layers), 1)
    ffn_hidden_dim = ffn_hidden_dim or default_ffn_hidden_dim(config, d_model)
    s = config.linear_std(d_model, d_model)
    target = ffn_output_variance(d_model, ffn_hidden_dim, num_layers, s)
    d_v = config.value_dim or d_model
    value_proj = d_v * s**2 if d_v != d_model else 1.0
    reads = energy * config.num_heads
    if config.variant == "peer":
        d_prev = config.pre_value_dim or d_model
        a_pre = d_model * s**2 if config.pre_value_dim else 1.0
        value_std = (target / (a_pre * reads * d_prev * value_proj)) ** 0.25
    else:  # one linear after the read: UltraMem's W_p [d_v, D], or the output projection
        projected = d_v * s**2 if config.value_expansion > 1 or d_v != d_model else 1.0
        value_std = (target / (reads * projected)) ** 0.5
    return UltraMemV2Init(linear_std=s, value_std=value_std, target_std=target**0.5,
                          weight_energy=energy)


def normal_init(std: float | jax.Array, logical_axes: tuple[str | None, ...]
                ) -> nn.initializers.Initializer:
    """N(0, std^2) with logical axes (`std` may be a traced scalar, computed during init)."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), logical_axes)
