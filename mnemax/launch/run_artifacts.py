"""The newest checkpoint of a run as the tools that use a trained model (`mnemax generate`,
`mnemax export`) need it: parameters and model state, in the recipe's layout."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from etils import epath

from mnemax.errors import MnemaxError
from mnemax.trainer.checkpoint import Checkpointer, abstract_with_shardings
from mnemax.trainer.loop import check_same_state
from mnemax.trainer.recipe import Recipe
from mnemax.trainer.setup import TrainProgram, build_program


@dataclasses.dataclass
class TrainedModel:
    """The newest checkpoint of a run: fp32 parameters and non-parameter model state."""

    program: TrainProgram
    params: Any
    model_state: Any
    step: int

    @property
    def variables(self) -> dict[str, Any]:
        """The flax variables `Transformer.apply` takes."""
        from mnemax.layers.components import MODEL_STATE

        return {"params": self.params, **({MODEL_STATE: self.model_state}
                                          if self.model_state else {})}


def restore_newest(recipe: Recipe, run_dir: epath.PathLike) -> TrainedModel:
    """The newest checkpoint in `run_dir/checkpoints`, read into `recipe`'s layout; a
    MnemaxError naming the fix when there is none or the recipe's model differs from it."""
    run_dir = epath.Path(run_dir)
    directory = run_dir / "checkpoints"
    if not directory.exists():
        raise MnemaxError(f"no checkpoint in {directory}: train first with "
                          f"`mnemax train {recipe.name} --run-dir {run_dir}`")
    ckpt = Checkpointer(directory, recipe.checkpoint)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise MnemaxError(f"no checkpoint in {directory}: train first with "
                              f"`mnemax train {recipe.name} --run-dir {run_dir}`")
        saved = ckpt.saved_recipe(step)
        if saved is not None:
            check_same_state(saved, recipe, step, ckpt.directory)
        program = build_program(recipe)
        target = abstract_with_shardings(program.abstract_state, program.state_shardings)
        state, _, _ = ckpt.restore(step, target)
    finally:
        ckpt.close()
    model_state = state.model_state
    if model_state is None:  # a checkpoint from before the train state had one
        model_state = program.init(jax.random.key(recipe.run.seed)).model_state
    return TrainedModel(program, state.params, model_state, step)

