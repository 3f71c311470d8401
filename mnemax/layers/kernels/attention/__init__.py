"""Causal (optionally sliding-window) grouped-query attention: the XLA path of
`jax.nn.dot_product_attention` and JAX's Pallas splash attention on TPU."""

from mnemax.layers.kernels.attention.op import ATTENTION_IMPLS, AttentionImpl, causal_attention

__all__ = ["ATTENTION_IMPLS", "AttentionImpl", "causal_attention"]
