"""Optimizer and learning-rate schedule from the recipe."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import jax
import optax

from mnemax.errors import check_choices, unknown_choice
from mnemax.layers.roles import DECAYED_ROLES, SPARSE_ROLES
from mnemax.trainer.compressed_adam import check_moments, scale_by_compressed_adam

OptimizerName = Literal["adamw"]
# Storage of Adam's moments (the keys of mnemax.trainer.compressed_adam.MOMENT_DTYPES).
MomentsDtype = Literal["float32", "bfloat16", "float8_e4m3"]
ScheduleDecay = Literal["cosine", "linear", "constant"]
OPTIMIZERS = get_args(OptimizerName)
DECAYS = get_args(ScheduleDecay)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Loshchilov & Hutter, 2019) with global-norm gradient clipping."""

    name: OptimizerName = "adamw"  # only adamw for now
    learning_rate: float = 3e-4  # peak learning rate, reached at the end of warmup
    b1: float = 0.9  # first-moment decay
    b2: float = 0.95  # second-moment decay
    eps: float = 1e-8  # denominator epsilon
    # Decoupled weight decay, on parameters whose role is `matrix` (projections, embeddings;
    # not norm gains, biases, gates, decay parameters, product keys or Tucker cores: see
    # mnemax/layers/roles.py).
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping
    # Peak lr of the sparsely updated tables (role `table`: memory values), which get no weight
    # decay; None = learning_rate.
    sparse_learning_rate: float | None = None
    # Storage of Adam's two moments between steps: float32 | bfloat16 | float8_e4m3 (COAT,
    # Xi et al. 2025: per-group scale and dynamic range expansion; see compressed_adam.py).
    moments_dtype: MomentsDtype = "float32"
    moments_group_size: int = 128  # elements sharing one float8 scale and exponent

    def __post_init__(self) -> None:
        check_choices(self, "optimizer")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then a decay to `min_lr_ratio * learning_rate`."""

    warmup_steps: int = 100  # steps of linear warmup from 0
    decay: ScheduleDecay = "cosine"
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    decay_steps: int | None = None  # step at which the decay ends; None = run.steps

    def __post_init__(self) -> None:
        check_choices(self, "schedule")


def make_schedule(opt: OptimizerConfig, sched: ScheduleConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step."""
    peak = opt.learning_rate
    end = sched.decay_steps or total_steps
    warmup = min(sched.warmup_steps, end)
    decay_len = max(end - warmup, 1)
    final = peak * sched.min_lr_ratio
    if sched.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_len, alpha=sched.min_lr_ratio)
    elif sched.decay == "linear":
        decay = optax.linear_schedule(peak, final, decay_len)
    elif sched.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise unknown_choice("schedule.decay", sched.decay, DECAYS)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(roles: Any) -> Any:
    """True for the parameters weight decay applies to, from the params' tree of roles."""
    return jax.tree.map(lambda role: role in DECAYED_ROLES, roles)


def param_groups(roles: Any) -> Any:
    """`sparse` for the parameters trained at `sparse_learning_rate` (role `table`), else
    `dense`."""
    return jax.tree.map(lambda role: "sparse" if role in SPARSE_ROLES else "dense", roles)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule,
                   roles: Any) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule) with weight decay on the parameters whose role is
    `matrix`; the sparse tables (role `table`) get Adam without weight decay at
    `sparse_learning_rate` (same schedule shape), as product-key memories are trained (Lample et
    al. 2019). `roles` is the params' tree of roles (`mnemax.layers.roles.param_roles`).

    With `opt.moments_dtype` bfloat16 or float8_e4m3 both groups keep their moments compressed
    (`scale_by_compressed_adam`, composed as `optax.adamw` composes `scale_by_adam`); float32
    is optax's own AdamW / Adam."""
    if opt.name not in OPTIMIZERS:
        raise unknown_choice("optimizer.name", opt.name, OPTIMIZERS)
    check_moments(opt.moments_dtype, opt.moments_group_size)
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    ratio = (opt.sparse_learning_rate or opt.learning_rate) / opt.learning_rate

    def sparse_schedule(step):
        return schedule(step) * ratio

    if opt.moments_dtype == "float32":
        dense = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.weight_decay, mask=decay_mask(roles))
        sparse = optax.adam(sparse_schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    else:
        def adam():
            return scale_by_compressed_adam(opt.b1, opt.b2, opt.eps, opt.moments_dtype,
                                            opt.moments_group_size)

        dense = optax.chain(adam(), optax.add_decayed_weights(opt.weight_decay, decay_mask(roles)),
                            optax.scale_by_learning_rate(schedule))
        sparse = optax.chain(adam(), optax.scale_by_learning_rate(sparse_schedule))
    parts.append(optax.multi_transform({"dense": dense, "sparse": sparse}, param_groups(roles)))
    return optax.chain(*parts)
