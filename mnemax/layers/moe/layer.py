"""The mixture-of-experts FFN as a flax module: route, run the chosen experts, weigh, sum."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mnemax.layers import axes, checkpoint_names
from mnemax.layers.components.base import MODEL_STATE, STATE_STATS
from mnemax.layers.mlp import SwiGLU
from mnemax.layers.moe.config import MoEConfig
from mnemax.layers.moe.dispatch import capacity_positions
from mnemax.layers.moe.expert_parallel import run_experts
from mnemax.layers.moe.router import (
    expert_counts,
    load_balance_loss,
    max_load,
    route,
    router_z_loss,
)

BIAS = "expert_bias"  # MODEL_STATE: DeepSeek-V3's balancing bias [E]
LOAD = "expert_load"  # STATE_STATS: tokens routed to each expert in this batch [E]
LOAD_BALANCE_LOSS = "loss/moe_load_balance"
ROUTER_Z_LOSS = "loss/moe_router_z"
MAX_LOAD = "moe/max_load"
DROPPED_FRACTION = "moe/dropped_fraction"
AUX_KEYS = (LOAD_BALANCE_LOSS, ROUTER_Z_LOSS, MAX_LOAD, DROPPED_FRACTION)


class MoELayer(nn.Module):
    """out = sum_{j<k} g_{t,j} E_{i_{t,j}}(x_t) + sum_s S_s(x_t) (DeepSeekMoE Eq. 9-11), with
    SwiGLU experts E_e(x) = (silu(x Wg_e) * x Wu_e) Wd_e and top-k routing (`router.route`).

    Input `[batch, time, embed]` -> (`[batch, time, embed]`, aux). Parameters: `router`
    [embed, expert] (logits in fp32), `gate`, `up` [expert, embed, mlp], `down`
    [expert, mlp, embed], and the shared experts as one SwiGLU `shared` of width S F (equal to
    S separate experts: their hidden units concatenated). With `bias_update_rate > 0` the
    MODEL_STATE variable `expert_bias` [expert] steers the sigmoid router's choice, and the
    per-expert token counts of the batch go to STATE_STATS `expert_load` for its update.

    aux: `loss/moe_load_balance` (weighted Switch loss), `loss/moe_router_z` (weighted ST-MoE
    z-loss), `moe/max_load` (max over experts of load / mean load, before drops) and
    `moe/dropped_fraction` (pairs over capacity / T k; 0 for dropless). T is the tokens of the
    batch the layer sees (one micro-batch, all devices); capacity is computed from that T.
    """

    config: MoEConfig
    init_std: float = 0.02
    out_init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.config
        batch, time, d = x.shape
        num_experts, width = cfg.num_experts, cfg.expert_dim
        init = nn.initializers.normal(self.init_std)
        router = self.param("router", nn.with_logical_partitioning(init, (axes.EMBED, axes.EXPERT)),
                            (d, num_experts))
        expert_in = nn.with_logical_partitioning(init, (axes.EXPERT, axes.EMBED, axes.MLP))
        w_gate = self.param("gate", expert_in, (num_experts, d, width))
        w_up = self.param("up", expert_in, (num_experts, d, width))
        w_down = self.param("down", nn.with_logical_partitioning(
            nn.initializers.normal(self.out_init_std), (axes.EXPERT, axes.MLP, axes.EMBED)),
            (num_experts, width, d))

        tokens = x.reshape(batch * time, d)
        logits = tokens.astype(jnp.float32) @ router.astype(jnp.float32)
        bias = None
        if cfg.has_bias:
            bias = self.variable(MODEL_STATE, BIAS, nn.with_logical_partitioning(
                nn.initializers.zeros, (axes.EXPERT,)), jax.random.key(0), (num_experts,),
                jnp.float32).value
        routing = route(logits, cfg, bias)
        counts = expert_counts(routing.expert_index, num_experts)
        if cfg.has_bias and self.is_mutable_collection(STATE_STATS):
            self.put_variable(STATE_STATS, LOAD, counts)

        weights = [w.astype(x.dtype) for w in (w_gate, w_up, w_down)]
        if cfg.dispatch == "dropless":
            keep = jnp.ones(routing.expert_index.shape, bool)
        else:  # which pairs fit is decided over the whole batch, so any layout drops the same
            _, keep = capacity_positions(routing.expert_index, num_experts,
                                         cfg.capacity(batch * time))
        y = run_experts(tokens, routing.expert_index, keep, *weights, impl=cfg.impl)
        dropped = jnp.sum(~keep) / keep.size  # a count over T k: exact, never < 0
        out = jnp.einsum("tkd,tk->td", y, routing.weights.astype(x.dtype)).reshape(x.shape)
        if cfg.num_shared_experts:
            out = out + SwiGLU(cfg.num_shared_experts * width, self.init_std, self.out_init_std,
                               name="shared")(x)
        out = nn.with_logical_constraint(out, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        out = checkpoint_name(out, checkpoint_names.MOE_OUT)
        aux = {
            LOAD_BALANCE_LOSS: cfg.load_balance_weight * load_balance_loss(
                routing.probs, counts, cfg.topk),
            ROUTER_Z_LOSS: cfg.z_loss_weight * router_z_loss(logits),
            MAX_LOAD: max_load(counts),
            DROPPED_FRACTION: dropped,
        }
        return out, aux
