"""Trainer-loop settings of a recipe."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from mnemax.errors import ConfigError, check_choices

# Activation and matmul dtype (the keys of mnemax.trainer.setup.COMPUTE_DTYPES).
ComputeDtype = Literal["float32", "bfloat16", "float16"]
NanPolicy = Literal["halt", "skip"]
NAN_POLICIES = get_args(NanPolicy)
Tracker = Literal["tensorboard", "wandb"]  # where metrics go besides metrics.jsonl


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The length and numerics of a run, and how it reports."""

    steps: int = 300  # total optimizer steps; a resumed run continues until this step
    grad_accum: int = 1  # micro-batches per step (gradient accumulation inside the step)
    compute_dtype: ComputeDtype = "bfloat16"  # activations, matmuls; params and Adam stay fp32
    z_loss_weight: float = 1e-4  # weight of the (log Z)^2 auxiliary loss on the output logits
    nan_policy: NanPolicy = "halt"  # non-finite loss: halt (keep last good checkpoint) or skip
    log_every: int = 10  # steps between metric lines / JSONL records
    seed: int = 0  # parameter init seed
    peak_flops_per_device: float | None = None  # for MFU; None = look up the device kind
    # persistent XLA cache; None = $JAX_COMPILATION_CACHE_DIR or ~/.cache/mnemax/xla; "" = off
    compile_cache_dir: str | None = None
    # metric trackers (process 0 only): tensorboard, wandb; a "a,b" string is accepted; () = none
    trackers: tuple[Tracker, ...] = ("tensorboard",)
    profile: str = ""  # "START:STEPS": jax.profiler trace of steps START.. into run_dir/profile

    def __post_init__(self) -> None:
        if isinstance(self.trackers, str):  # RunConfig(trackers="tensorboard,wandb")
            names = tuple(t.strip() for t in self.trackers.split(",") if t.strip())
            object.__setattr__(self, "trackers", names)
        check_choices(self, "run")
        window = profile_window(self.profile)
        if window is not None and window[0] > self.steps:
            raise ConfigError(f"run.profile={self.profile!r} starts after the run's last step "
                              f"(run.steps={self.steps}); choose START <= {self.steps}")

    @property
    def profile_steps(self) -> tuple[int, int] | None:
        """`(first, last)` steps (inclusive, numbered as in metrics.jsonl) to trace, or None."""
        return profile_window(self.profile)


def profile_window(profile: str) -> tuple[int, int] | None:
    """`"START:STEPS"` -> `(START, START + STEPS - 1)`; `""` -> None; anything else is a
    ConfigError. Steps count from 1 (step 1 is the first optimizer step), as in the metrics."""
    if not profile.strip():
        return None
    start, sep, steps = profile.partition(":")
    try:
        first, count = int(start), int(steps)
    except ValueError:
        first = count = -1
    if not sep or first < 1 or count < 1:
        raise ConfigError(
            f"run.profile={profile!r} is not START:STEPS with START >= 1 and STEPS >= 1 (steps "
            "count from 1); e.g. run.profile=10:5 traces steps 10 to 14, run.profile= traces "
            "nothing")
    return first, first + count - 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic validation."""

    every: int = 100  # steps between evaluations; 0 disables periodic eval
    batches: int = 4  # validation batches per evaluation (same shape as training batches)
