"""Checkpoints with orbax: train state, data-iterator state and the resolved recipe, per step."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import sys
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mnemax.errors import CheckpointError

DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint `<step>` is renamed `damaged-<step>`


class DamagedCheckpointError(CheckpointError):
    """A checkpoint holds the arrays the recipe expects but its files cannot be read."""

    def __init__(self, message: str, step: int, reason: str):
        super().__init__(message)
        self.step = step
        self.reason = reason  # the reader's error, shortened to one line


def _abandoned_read(unraisable: Any) -> bool:
    """Whether an exception Python could not raise comes from a restore orbax gave up: its
    per-array read coroutines, never awaited, and their callbacks into a closed event loop."""
    obj, exc = unraisable.object, unraisable.exc_value
    if isinstance(obj, types.CoroutineType):
        return "orbax" in obj.cr_code.co_filename
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _drop_abandoned_reads(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def hook(unraisable: Any) -> None:
        if not _abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True  # type: ignore[attr-defined]
    return hook


class _UnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "Future exception was never retrieved" records for the reads of the
    checkpoints named in `paths`: a failed restore leaves one per unreadable array, logged when
    the futures are collected, which may be long after the restore (at exit, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and any(p in message for p in self.paths))


_UNRETRIEVED = _UnretrievedReadErrors()
logging.getLogger("asyncio").addFilter(_UNRETRIEVED)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Keeps a failing restore's noise off the console: orbax's and asyncio's error logging,
    and the "Exception ignored in: <coroutine ...>" tracebacks (hundreds of lines for one
    damaged file) that its abandoned reads print when they are collected, now or later. The
    failure itself reaches the caller as an exception, which says what is wrong."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
            try:
                yield
            except BaseException:
                gc.collect()  # finalize what the failed restore left while warnings are off
                raise
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
        # Replacing the handler is the point: orbax's "Type handler registry type ... overriding"
        # warning (absl, on every run) is dropped for this call only.
        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(_drop_handler_override_warning)
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
                override=True)
        finally:
            absl_logger.removeFilter(_drop_handler_override_warning)


def _drop_handler_override_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Type handler registry type")


class Checkpointer:
    """Saves and restores `{"state", "data", "recipe"}` under `directory/<step>/`."""

    def __init__(self, directory: epath.PathLike, config: CheckpointConfig):
        _write_whole_replicas_on_cpu()
        directory = epath.Path(directory)
        # A local path is made absolute (orbax requires it); a URL (gs://...) already is.
        self.directory = directory if is_url(directory) else epath.Path(
            directory.expanduser().absolute())
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
            with quiet_orbax():
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        data=ocp.args.JsonRestore(),
                        recipe=ocp.args.JsonRestore(),
                    ),
                )
        except Exception as err:  # orbax/tensorstore raise many types
            _UNRETRIEVED.paths.add(str(path))
            raise self._restore_error(path, target, err, step) from err
        state = restored.state
        if without_model_state:
            state = abstract_state.replace(step=state["step"], params=state["params"],
                                           opt_state=state["opt_state"], model_state=None)
        return state, restored.data, restored.recipe

    @staticmethod
    def _has_model_state(path: epath.Path) -> bool:
        """Whether checkpoint `path`'s train state has a `model_state` entry (True when its
        metadata cannot be read: the restore then reports what is wrong)."""
        try:
            with quiet_orbax():
                tree = ocp.StandardCheckpointer().metadata(path / "state").item_metadata.tree
        except Exception:
            return True
        return not isinstance(tree, dict) or "model_state" in tree

    @staticmethod
    def _restore_error(path: epath.Path, abstract_state: Any, err: Exception,
                       step: int) -> CheckpointError:
        """Says why checkpoint `path` could not be restored into `abstract_state`: arrays of
        other shapes than the recipe builds (another model, optimizer or mnemax version: the
        checkpoint is good) or, when its arrays are the ones expected, damaged files."""
        reason = " ".join(str(err).split())[:300]
        try:
            with quiet_orbax():
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
        return DamagedCheckpointError(
            f"checkpoint {path} could not be read ({type(err).__name__}: {reason}). Its files "
            f"are damaged (a save that was cut short, or a truncated copy). Move {path} out of "
            f"{path.parent} to resume from the previous checkpoint, or start in a new --run-dir",
            step, f"{type(err).__name__}: {reason[:100]}")

    def saved_recipe(self, step: int) -> dict | None:
        """The recipe stored with checkpoint `step`, read without touching the arrays."""
        path = self.directory / str(step) / "recipe" / "metadata"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def set_aside(self, step: int) -> epath.Path:
        """Renames damaged checkpoint `step` to `damaged-<step>` (kept for inspection, and out
        of the way of the save of the same step that the resumed run will make). Call on the
        primary process only; returns the new path."""
        aside = self.directory / f"{DAMAGED_PREFIX}{step}"
        suffix = 1
        while aside.exists():  # the same step damaged twice: keep both
            aside, suffix = self.directory / f"{DAMAGED_PREFIX}{step}.{suffix}", suffix + 1
        (self.directory / str(step)).rename(aside)
        return aside

    def reload(self) -> None:
        """Re-reads the list of checkpoints (after `set_aside` on some process)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def is_url(path: epath.PathLike) -> bool:
    """Whether `path` names an object store or other fsspec filesystem (`gs://b/x`)."""
    return "://" in str(path)


def _array_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of the arrays in a state tree or in a checkpoint's metadata tree:
    what must agree for a restore, whatever containers hold them."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
    return sorted((tuple(int(d) for d in x.shape), str(np.dtype(x.dtype))) for x in leaves)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s carrying the target shardings, for restore."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
