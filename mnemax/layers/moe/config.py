"""Configuration of the mixture-of-experts FFN: routers, dispatch, balancing, and its size."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from mnemax.errors import ConfigError, check_block_indices, check_choices
from mnemax.layers.kernels.dispatch import Impl

RouterKind = Literal["softmax", "sigmoid"]
DispatchKind = Literal["dropless", "capacity"]
MoEMode = Literal["replace", "parallel"]
PATH = "model.moe"  # where a recipe holds this config; error messages name keys under it


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Top-k routed SwiGLU experts (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral,
    Jiang et al. 2024) with optional always-on shared experts (DeepSeekMoE, Dai et al. 2024)
    and DeepSeek-V3's auxiliary-loss-free balancing bias (Liu et al. 2024, Sec. 2.1.2).

    Routers: `softmax` (Switch/Mixtral: p = softmax(logits), the top-k of p weigh the experts)
    or `sigmoid` (DeepSeek-V3 Eq. 13-16: s = sigmoid(logits), the top-k of s + bias are chosen,
    s without the bias weighs them). `normalize_weights=None` follows each router's paper:
    renormalised to sum 1 for sigmoid (DeepSeek-V3 Eq. 13), raw probabilities for softmax
    (Switch Eq. 2, DeepSeekMoE / DeepSeek-V2; with top-1 a renormalised weight is always 1 and
    the router would get no gradient from the output).
    """

    num_experts: int = 8  # routed experts E
    topk: int = 2  # experts per token k
    expert_dim: int = 512  # hidden width F of each SwiGLU expert (routed and shared)
    router: RouterKind = "softmax"  # softmax (Switch/Mixtral) | sigmoid (DeepSeek-V3)
    normalize_weights: bool | None = None  # top-k weights sum to 1; None = sigmoid only
    num_shared_experts: int = 0  # always-on experts of width expert_dim (DeepSeekMoE)
    dispatch: DispatchKind = "dropless"  # dropless (sort + grouped matmul) | capacity (drops)
    # capacity: C = ceil(capacity_factor * T * k / E) slots per expert, T = the tokens of the
    # micro-batch the layer sees
    capacity_factor: float = 1.25
    load_balance_weight: float = 0.01  # alpha of Switch's E * sum_e f_e P_e (Switch: 0.01)
    z_loss_weight: float = 0.001  # weight of ST-MoE's mean logsumexp(logits)^2 (ST-MoE: 0.001)
    # DeepSeek-V3's bias step gamma per train step (its value: 0.001); 0 = no bias; sigmoid only
    bias_update_rate: float = 0.0
    layers: tuple[int, ...] = ()  # indices of the blocks that hold the MoE
    mode: MoEMode = "replace"  # replace: MoE instead of the dense FFN; parallel: beside it
    ffn_ratio: float = 1.0  # parallel mode: dense FFN hidden width multiplier
    # grouped matmul backend (mnemax.layers.kernels.dispatch): auto = megablox on TPU (shipped
    # with JAX), jax.lax.ragged_dot elsewhere
    impl: Impl = "auto"

    def __post_init__(self) -> None:
        check_choices(self, PATH)

    @property
    def normalizes(self) -> bool:
        """Whether the top-k weights are renormalised to sum 1 (see the class docstring)."""
        if self.normalize_weights is None:
            return self.router == "sigmoid"
        return self.normalize_weights

    @property
    def has_bias(self) -> bool:
        """Whether the layer keeps DeepSeek-V3's balancing bias (non-parameter state)."""
        return self.bias_update_rate > 0

    def capacity(self, tokens: int) -> int:
        """Slots per expert for `tokens` tokens: ceil(capacity_factor * tokens * k / E)."""
        return math.ceil(self.capacity_factor * tokens * self.topk / self.num_experts)

    def param_count(self, d_model: int) -> int:
        """Router [D, E], routed experts 3 x [E, D, F], shared experts 3 x [D, S F]."""
        expert = 3 * d_model * self.expert_dim
        return (d_model * self.num_experts + self.num_experts * expert
                + self.num_shared_experts * expert)

    def flops_per_token(self, d_model: int) -> float:
        """Active training FLOPs per token (forward + backward = 3 x the forward's 2 per
        multiply-add): the router, k routed experts and the shared experts."""
        active = d_model * self.num_experts + (self.topk + self.num_shared_experts) * (
            3 * d_model * self.expert_dim)
        return 6.0 * active

    def validate(self, d_model: int, num_layers: int) -> None:
        """Raises ConfigError naming the field (by its override path, `model.moe.topk`) that
        cannot build the layer."""
        check_choices(self, PATH)
        for name in ("num_experts", "topk", "expert_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{PATH}.{name}={getattr(self, name)} must be >= 1")
        if self.topk > self.num_experts:
            raise ConfigError(f"{PATH}.topk={self.topk} exceeds {PATH}.num_experts="
                              f"{self.num_experts}: a token cannot pick more experts than exist; "
                              "lower topk or add experts")
        if self.num_shared_experts < 0:
            raise ConfigError(f"{PATH}.num_shared_experts={self.num_shared_experts} must be "
                              ">= 0")
        if self.capacity_factor <= 0:
            raise ConfigError(f"{PATH}.capacity_factor={self.capacity_factor} must be > 0 "
                              "(1.0 = exactly the balanced load per expert)")
        for name in ("load_balance_weight", "z_loss_weight", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{PATH}.{name}={getattr(self, name)} must be >= 0")
        if self.bias_update_rate and self.router != "sigmoid":
            raise ConfigError(f"{PATH}.bias_update_rate={self.bias_update_rate} is DeepSeek-V3's "
                              "auxiliary-loss-free balancing, defined for its sigmoid router: "
                              f"set {PATH}.router=sigmoid or {PATH}.bias_update_rate=0")
        if self.mode == "parallel" and self.ffn_ratio <= 0:
            raise ConfigError(f"{PATH}.ffn_ratio={self.ffn_ratio} must be > 0 in parallel mode "
                              f"(or set {PATH}.mode=replace)")
        check_block_indices(PATH, self.layers, num_layers)
