"""Optimizer and learning-rate schedule from the recipe."""

from __future__ import annotations

import dataclasses

import jax
import optax

from mnemax.errors import ConfigError
from mnemax.trainer.compressed_adam import check_moments, scale_by_compressed_adam


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Loshchilov & Hutter, 2019) with global-norm gradient clipping."""

    name: str = "adamw"  # only adamw for now
    learning_rate: float = 3e-4  # peak learning rate, reached at the end of warmup
    b1: float = 0.9  # first-moment decay
    b2: float = 0.95  # second-moment decay
    eps: float = 1e-8  # denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay, applied to matrices only (ndim >= 2)
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables clipping
    # Sparsely updated tables (memory values): their own learning rate and no weight decay.
    sparse_params: tuple[str, ...] = ("values", "memory_values", "expert_down")  # param names
    sparse_learning_rate: float | None = None  # peak lr of sparse_params; None = learning_rate
    # Storage of Adam's two moments between steps: float32 | bfloat16 | float8_e4m3 (COAT,
    # Xi et al. 2025: per-group scale and dynamic range expansion; see compressed_adam.py).
    moments_dtype: str = "float32"
    moments_group_size: int = 128  # elements sharing one float8 scale and exponent


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then a decay to `min_lr_ratio * learning_rate`."""

    warmup_steps: int = 100  # steps of linear warmup from 0
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    decay_steps: int | None = None  # step at which the decay ends; None = run.steps


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
        raise ConfigError(f"schedule.decay={sched.decay!r} is unknown; choose cosine, linear or "
                          "constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _param_groups(opt: OptimizerConfig):
    """Labels each parameter `sparse` (its name is in `opt.sparse_params`) or `dense`."""

    def label(path, _leaf):
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        return "sparse" if name in opt.sparse_params else "dense"

    return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule) with weight decay on matrices only; parameters named
    in `opt.sparse_params` get Adam without weight decay at `sparse_learning_rate` (same schedule
    shape), as product-key memories are trained (Lample et al. 2019).

    With `opt.moments_dtype` bfloat16 or float8_e4m3 both groups keep their moments compressed
    (`scale_by_compressed_adam`, composed as `optax.adamw` composes `scale_by_adam`); float32
    is optax's own AdamW / Adam."""
    if opt.name != "adamw":
        raise ConfigError(f"optimizer.name={opt.name!r} is unknown; available: adamw")
    check_moments(opt.moments_dtype, opt.moments_group_size)
    parts = []
    if opt.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.clip_norm))
    ratio = (opt.sparse_learning_rate or opt.learning_rate) / opt.learning_rate

    def sparse_schedule(step):
        return schedule(step) * ratio

    if opt.moments_dtype == "float32":
        dense = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                            weight_decay=opt.weight_decay, mask=_decay_mask)
        sparse = optax.adam(sparse_schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    else:
        def adam():
            return scale_by_compressed_adam(opt.b1, opt.b2, opt.eps, opt.moments_dtype,
                                            opt.moments_group_size)

        dense = optax.chain(adam(), optax.add_decayed_weights(opt.weight_decay, _decay_mask),
                            optax.scale_by_learning_rate(schedule))
        sparse = optax.chain(adam(), optax.scale_by_learning_rate(sparse_schedule))
    parts.append(optax.multi_transform({"dense": dense, "sparse": sparse}, _param_groups(opt)))
    return optax.chain(*parts)
