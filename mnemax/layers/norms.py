"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers import axes


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis; statistics in fp32, output in the input dtype.

    Input `[..., dim]`; parameter `scale: [dim]` with logical axis `norm`.
    """

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)
