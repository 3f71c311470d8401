"""Next-token cross entropy with z-loss (PaLM, Chowdhery et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean token cross entropy and mean z-loss (log Z)^2.

    Args:
      logits: `[batch, time, vocab]` (computed in fp32).
      targets: `[batch, time]` int32.
    Returns:
      (mean cross entropy, mean of logsumexp(logits)^2), both fp32 scalars.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - target_logit), jnp.mean(jnp.square(log_z))
