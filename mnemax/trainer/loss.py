"""Next-token cross entropy with z-loss (PaLM, Chowdhery et al. 2022)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mnemax.layers.factored_logits import FactoredLogits, log_z_and_target_logit


def cross_entropy(logits: jax.Array | FactoredLogits,
                  targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean token cross entropy and mean z-loss (log Z)^2, in fp32.

    Args:
      logits: `[batch, time, vocab]` (fp32, or cast to it here), or `FactoredLogits`, whose
        loss is computed a chunk of positions at a time.
      targets: `[batch, time]` integer ids in `[0, vocab)`.
    Returns:
      (mean of logsumexp(logits) - logits[target], mean of logsumexp(logits)^2), fp32 scalars.
    """
    if isinstance(logits, FactoredLogits):
        return logits.cross_entropy(targets)
    log_z, target_logit = log_z_and_target_logit(logits.astype(jnp.float32), targets)
    return jnp.mean(log_z - target_logit), jnp.mean(jnp.square(log_z))
