"""Rotary position embedding (Su et al., "RoFormer", 2021), half-split (Llama/NeoX) layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + d/2]) by angle position * theta^(-2i/d).

    Args:
      x: `[batch, time, heads, head_dim]`, head_dim even.
      positions: `[batch, time]` or `[time]` integer positions.
    Returns:
      Same shape and dtype as `x`; the rotation is computed in fp32.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) time, half]
    if angles.ndim == 2:
        angles = angles[None]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
