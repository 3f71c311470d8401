"""SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020)."""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes, checkpoint_names


class SwiGLU(nn.Module):
    """out = (silu(x W_gate) * (x W_up)) W_down.

    Input `[batch, time, embed]` -> `[batch, time, embed]`; parameters `gate`, `up:
    [embed, mlp]`, `down: [mlp, embed]`. Tags for remat policies (`[batch, time, mlp]`):
    `mlp_gate` (x W_gate), `mlp_up` (x W_up), `mlp_hidden` (the down projection's input).
    """

    hidden_dim: int
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        gate = self.param("gate", nn.with_logical_partitioning(init, (axes.EMBED, axes.MLP)),
                          (embed, self.hidden_dim))
        up = self.param("up", nn.with_logical_partitioning(init, (axes.EMBED, axes.MLP)),
                        (embed, self.hidden_dim))
        down = self.param(
            "down",
            nn.with_logical_partitioning(nn.initializers.normal(self.out_init_std),
                                         (axes.MLP, axes.EMBED)),
            (self.hidden_dim, embed),
        )
        h_gate = checkpoint_name(x @ gate.astype(x.dtype), checkpoint_names.MLP_GATE)
        h_up = checkpoint_name(x @ up.astype(x.dtype), checkpoint_names.MLP_UP)
        h = nn.with_logical_constraint(jax.nn.silu(h_gate) * h_up,
                                       (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        h = checkpoint_name(h, checkpoint_names.MLP_HIDDEN)
        return h @ down.astype(x.dtype)


def swiglu_hidden_dim(d_model: int, multiple_of: int = 256) -> int:
    """Llama's hidden size: 2/3 of 4 * d_model, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


__all__ = ["SwiGLU", "swiglu_hidden_dim"]
