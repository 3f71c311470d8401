"""SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020)."""

from __future__ import annotations

import flax.linen as nn
import jax

from mnemax.layers import axes


class SwiGLU(nn.Module):
    """out = (silu(x W_gate) * (x W_up)) W_down.

    Input `[batch, time, embed]` -> `[batch, time, embed]`; parameters `gate`, `up:
    [embed, mlp]`, `down: [mlp, embed]`.
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
        h = jax.nn.silu(x @ gate.astype(x.dtype)) * (x @ up.astype(x.dtype))
        h = nn.with_logical_constraint(h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        return h @ down.astype(x.dtype)


def swiglu_hidden_dim(d_model: int, multiple_of: int = 256) -> int:
    """Llama's hidden size: 2/3 of 4 * d_model, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * -(-hidden // multiple_of)


__all__ = ["SwiGLU", "swiglu_hidden_dim"]
