"""Checkpoints with orbax: train state, data-iterator state and the resolved recipe, per step."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mnemax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how checkpoints are written."""

    every: int = 100  # steps between checkpoints; 0 = only at the end of the run and on SIGTERM
    keep: int = 3  # newest checkpoints kept on disk
    async_save: bool = True  # write in a background thread while training continues
    resume: bool = True  # resume from the newest checkpoint in the run directory


def _write_whole_replicas_on_cpu() -> None:
    """On CPU, write each replicated array from one device instead of splitting it.

    Orbax's replica-parallel writes slice every replicated array across replicas; on fake CPU
    devices each slice is a separate XLA compilation, which made a save of a small model on 8
    fake devices take minutes. Accelerators keep the parallel default.
    """
    if jax.devices()[0].platform == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    """Saves and restores `{"state", "data", "recipe"}` under `directory/<step>/`."""

    def __init__(self, directory: str | Path, config: CheckpointConfig):
        _write_whole_replicas_on_cpu()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            enable_async_checkpointing=config.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "recipe"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, recipe: dict) -> None:
        """Starts writing checkpoint `step` (asynchronously when so configured)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                recipe=ocp.args.JsonSave(recipe),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Reads checkpoint `step` into the layout of `abstract_state`.

        `abstract_state` holds `jax.ShapeDtypeStruct`s with shardings, so arrays land directly
        in the current strategy's layout (which may differ from the one that wrote them).
        """
        path = self.directory / str(step)
        # Checkpoints written before the train state had `model_state` hold the other fields
        # only: restore those; the caller starts the model state from its initial value.
        without_model_state = (hasattr(abstract_state, "model_state")
                               and not self._has_model_state(path))
        target = abstract_state
        if without_model_state:
            target = {"step": abstract_state.step, "params": abstract_state.params,
                      "opt_state": abstract_state.opt_state}
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    recipe=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax/tensorstore raise many types
            raise self._restore_error(path, target, err) from err
        state = restored.state
        if without_model_state:
            state = abstract_state.replace(step=state["step"], params=state["params"],
                                           opt_state=state["opt_state"], model_state=None)
        return state, restored.data, restored.recipe

    @staticmethod
    def _has_model_state(path: Path) -> bool:
        """Whether checkpoint `path`'s train state has a `model_state` entry (True when its
        metadata cannot be read: the restore then reports what is wrong)."""
        try:
            tree = ocp.StandardCheckpointer().metadata(path / "state").item_metadata.tree
        except Exception:
            return True
        return not isinstance(tree, dict) or "model_state" in tree

    @staticmethod
    def _restore_error(path: Path, abstract_state: Any, err: Exception) -> CheckpointError:
        """Says why checkpoint `path` could not be restored into `abstract_state`: arrays of
        other shapes than the recipe builds (another model, optimizer or mnemax version: the
        checkpoint is good) or, when its arrays are the ones expected, damaged files."""
        reason = " ".join(str(err).split())[:300]
        try:
            saved = ocp.StandardCheckpointer().metadata(path / "state").item_metadata.tree
            saved_arrays = _array_signature(saved)
        except Exception:  # the metadata itself is unreadable: damaged
            saved_arrays = None
        expected = _array_signature(abstract_state)
        if saved_arrays is not None and saved_arrays != expected:
            missing = list((Counter(expected) - Counter(saved_arrays)).elements())[:3]
            extra = list((Counter(saved_arrays) - Counter(expected)).elements())[:3]
            return CheckpointError(
                f"checkpoint {path} holds a different train state than this recipe builds "
                f"({len(saved_arrays)} arrays saved, {len(expected)} expected; the recipe needs "
                f"{missing or 'nothing new'}, the checkpoint has {extra or 'nothing else'}): it "
                "was written by another model or optimizer configuration, or another mnemax "
                "version. Set the recipe back, or train in a new --run-dir"
            )
        return CheckpointError(
            f"checkpoint {path} could not be read ({type(err).__name__}: {reason}). Its files "
            f"are damaged (a save that was cut short, or a truncated copy). Move {path} out of "
            f"{path.parent} to resume from the previous checkpoint, or start in a new --run-dir"
        )

    def saved_recipe(self, step: int) -> dict | None:
        """The recipe stored with checkpoint `step`, read without touching the arrays."""
        path = self.directory / str(step) / "recipe" / "metadata"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _array_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of the arrays in a state tree or in a checkpoint's metadata tree:
    what must agree for a restore, whatever containers hold them."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
    return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in leaves)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s carrying the target shardings, for restore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
