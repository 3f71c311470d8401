"""Trainer-loop settings of a recipe."""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

from mnemax.errors import check_choices

# Activation and matmul dtype (the keys of mnemax.trainer.setup.COMPUTE_DTYPES).
ComputeDtype = Literal["float32", "bfloat16", "float16"]
NanPolicy = Literal["halt", "skip"]
NAN_POLICIES = get_args(NanPolicy)


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

    def __post_init__(self) -> None:
        check_choices(self, "run")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Periodic validation."""

    every: int = 100  # steps between evaluations; 0 disables periodic eval
    batches: int = 4  # validation batches per evaluation (same shape as training batches)
