"""Experiment trackers that `MetricsWriter` fans metric records out to: TensorBoard event files
and Weights & Biases.

A tracker gets each record's step and its numeric fields. Only process 0 opens trackers
(`MetricsWriter(enabled=False)` on the others opens none), so a multi-process job is one
TensorBoard run and one wandb run.
"""

from __future__ import annotations

import math
import os
import secrets
import string
from collections.abc import Sequence
from typing import Any, Protocol

from etils import epath

from mnemax.errors import ConfigError
from mnemax.trainer.config import Tracker

WANDB_RUN_ID_FILE = "wandb_run_id"  # in the run dir: the wandb run a resume continues


class MetricTracker(Protocol):
    """Where a metric record goes besides `metrics.jsonl`."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Records finite scalar `metrics` at `step` (an optimizer step, from 1)."""

    def close(self) -> None:
        """Flushes and ends the run."""


class TensorBoardTracker:
    """Scalars in `run_dir/tensorboard` (tensorboardX writes URLs such as gs:// itself)."""

    def __init__(self, run_dir: epath.Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "run.trackers includes wandb, but the wandb package is not installed: "
            "pip install 'mnemax[wandb]' (or pip install wandb), or drop wandb from "
            "run.trackers (e.g. --set run.trackers=tensorboard)") from None
    return wandb


class WandbTracker:
    """A wandb run holding the resolved recipe as its config and the metrics by step.

    Its id is kept in `run_dir/wandb_run_id`: a resumed training run continues the same wandb
    run (`resume="allow"`). The metrics are plotted against a `step` metric rather than
    wandb's own monotonic step, so a resume that logs again the steps after its checkpoint
    (written by the run that died) is not dropped. `WANDB_MODE=offline`, `WANDB_PROJECT`,
    `WANDB_ENTITY` and `WANDB_DIR` are read by wandb as usual; without `WANDB_DIR`, a local run
    dir holds wandb's files (`run_dir/wandb/`).
    """

    def __init__(self, run_dir: epath.Path, config: dict[str, Any], name: str):
        wandb = _import_wandb()
        id_path = run_dir / WANDB_RUN_ID_FILE
        if id_path.exists():
            run_id = id_path.read_text().strip()
        else:
            # wandb's own run ids: 8 characters of [a-z0-9]
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))
            id_path.write_text(run_id + "\n")
        local_dir = None if "://" in str(run_dir) else str(run_dir)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mnemax"), name=name, id=run_id,
            resume="allow", config=config, dir=os.environ.get("WANDB_DIR") or local_dir,
            # mnemax prints its own lines and keeps train.log; wandb wrapping stdout would
            # interleave them with its own.
            settings=wandb.Settings(console="off"))
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    @property
    def run_id(self) -> str:
        return self._run.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log({"step": step, **metrics})

    def close(self) -> None:
        self._run.finish()


def open_trackers(names: Sequence[Tracker], run_dir: epath.Path,
                  config: dict[str, Any] | None = None) -> list[MetricTracker]:
    """The trackers `names` (the recipe's `run.trackers`) for `run_dir`; `config` is the
    resolved recipe (wandb's run config; its `name` names the wandb run)."""
    config = config or {}
    opened: list[MetricTracker] = []
    for name in dict.fromkeys(names):  # each once, in order
        if name == "tensorboard":
            opened.append(TensorBoardTracker(run_dir))
        elif name == "wandb":
            opened.append(WandbTracker(run_dir, config, str(config.get("name", run_dir.name))))
        else:
            raise ConfigError(f"run.trackers: unknown tracker {name!r}; choose from "
                              "tensorboard, wandb")
    return opened


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a metric record, without its `step`."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}
