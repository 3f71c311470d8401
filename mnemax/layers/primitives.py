"""Normalisations that several layers share, written once.

Both compute in fp32 whatever the input dtype and return the input dtype; `eps` is added to the
mean (or sum) of squares, inside the square root.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x / sqrt(sum(x^2) + eps)` over the last axis: `[..., d] -> [..., d]`."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def rms_normalize(x: jax.Array, eps: float, scale: jax.Array | None = None) -> jax.Array:
    """`x / sqrt(mean(x^2) + eps) * scale` over the last axis (Zhang & Sennrich 2019):
    `[..., d]`, `scale [d]` or None -> `[..., d]`."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    if scale is not None:
        normed = normed * scale.astype(jnp.float32)
    return normed.astype(x.dtype)
