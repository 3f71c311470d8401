"""What `mnemax show` prints: the resolved recipe, size, FLOPs and memory per device."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.pretty import Pretty

from mnemax.recipes.schema import Recipe, recipe_to_dict


def summarize(recipe: Recipe) -> dict[str, Any]:
    """Builds the program abstractly (no compilation, no device memory) and measures it."""
    from mnemax.trainer.setup import build_program

    program = build_program(recipe)
    return {
        "name": recipe.name,
        "recipe": recipe_to_dict(recipe),
        "params": program.param_count,
        "flops_per_token": recipe.model.flops_per_token(recipe.data.seq_len),
        "tokens_per_step": recipe.data.global_batch * recipe.data.seq_len,
        "mesh": {k: int(v) for k, v in program.mesh.shape.items()},
        "zero_stage": recipe.strategy.zero_stage,
        "memory_per_device": program.memory_per_device(),
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def print_summary(summary: dict[str, Any]) -> None:
    console = Console(highlight=False)
    console.print(Pretty(summary["recipe"], expand_all=True))
    mem = summary["memory_per_device"]
    console.print(f"[bold]{summary['name']}[/bold]")
    console.print(f"  parameters        {summary['params']:,}")
    console.print(f"  FLOPs per token   {summary['flops_per_token']:.4g} (training, fwd+bwd)")
    console.print(f"  tokens per step   {summary['tokens_per_step']:,}")
    console.print(f"  mesh              {summary['mesh']}  (ZeRO stage {summary['zero_stage']})")
    console.print("  per device:       "
                  f"params {_gib(mem['params_bytes'])}, grads {_gib(mem['grads_bytes'])}, "
                  f"optimizer state {_gib(mem['opt_state_bytes'])}")
