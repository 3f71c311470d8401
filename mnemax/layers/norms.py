"""RMSNorm (Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnemax.layers import axes
from mnemax.layers.primitives import rms_normalize


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
        return rms_normalize(x, self.eps, scale)
