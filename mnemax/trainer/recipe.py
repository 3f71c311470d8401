"""The recipe: one frozen dataclass tree that says everything a run does.

It lives in the trainer, the lowest layer that knows every section's config (the strategy from
`mnemax.parallel`, data / optimizer / checkpoint / run from the trainer), so that the trainer
reads it without importing `mnemax.recipes`, where the built-in recipes that fill it in live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn

from mnemax.parallel.strategy import Strategy
from mnemax.trainer.checkpoint import CheckpointConfig
from mnemax.trainer.config import EvalConfig, RunConfig
from mnemax.trainer.data import DataConfig
from mnemax.trainer.optimizer import OptimizerConfig, ScheduleConfig


class ModelConfig(Protocol):
    """What the trainer needs of a model config (any frozen dataclass with these members)."""

    vocab_size: int

    def build(self, *, remat: bool = False, remat_policy: Callable | None = None) -> nn.Module:
        """A flax module mapping tokens `[batch, time]` to `(logits, aux)`."""

    def param_count(self) -> int:
        """Number of parameters."""

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward and backward)."""

    # Optional: `update_model_state(state, stats) -> state`, the model's non-parameter state
    # (its `model_state` flax collection) after a step, from the `state_stats` it recorded,
    # averaged over the step's micro-batches. Models without one keep `{}`.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A model + a parallel strategy + data + optimizer + schedule + checkpoint/eval/run policy."""

    model: Any  # a ModelConfig dataclass (e.g. mnemax.layers.transformer.TransformerConfig)
    strategy: Strategy = Strategy()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    name: str = "recipe"  # what `mnemax show` and logs call it


def recipe_to_dict(recipe: Recipe) -> dict:
    """JSON-ready nested dict; the model section records its dataclass as `_type`."""
    out = dataclasses.asdict(recipe)
    model_cls = type(recipe.model)
    out["model"] = {"_type": f"{model_cls.__module__}.{model_cls.__qualname__}", **out["model"]}
    return out
