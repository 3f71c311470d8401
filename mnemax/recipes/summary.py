"""What `mnemax show` prints: the resolved recipe, size, FLOPs and memory per device."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.pretty import Pretty

from mnemax.recipes.schema import Recipe, recipe_to_dict


def zero_formula_bytes(params: int, stage: int, mesh_shape: dict[str, int]) -> dict[str, float]:
    """ZeRO's per-device model-state bytes with fp32 params and grads and Adam's two fp32
    moments (Rajbhandari et al. 2020 with K = 8): stage 0: 16 Psi; 1: 8 Psi + 8 Psi / N;
    2: 4 Psi + 12 Psi / N; 3: 16 Psi / N (N = the degree of the axes each stage shards over:
    data x fsdp for 1 and 2, fsdp for 3, whose parameters FSDP splits)."""
    n = mesh_shape["data"] * mesh_shape["fsdp"] if stage in (1, 2) else mesh_shape["fsdp"]
    p, g, o = 4.0 * params, 4.0 * params, 8.0 * params
    if stage >= 1:
        o /= n
    if stage >= 2:
        g /= n
    if stage >= 3:
        p /= n
    return {"params_bytes": p, "grads_bytes": g, "opt_state_bytes": o}


def compiled_memory(program: Any) -> dict[str, int]:
    """Per-device bytes XLA reports for the compiled train step (compiled from abstract
    inputs: nothing is allocated). Arguments = params + optimizer state + batch; temp holds the
    gradients, activations and workspace."""
    import jax

    from mnemax.trainer.checkpoint import abstract_with_shardings

    state = abstract_with_shardings(program.abstract_state, program.state_shardings)
    data = program.recipe.data
    batch = jax.ShapeDtypeStruct((data.global_batch, data.seq_len + 1), jax.numpy.int32,
                                 sharding=program.batch_sharding)
    stats = program.train_step.lower(state, batch).compile().memory_analysis()
    return {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }


def summarize(recipe: Recipe, *, compiled: bool = False) -> dict[str, Any]:
    """Builds the program abstractly (no device memory) and measures it; with `compiled`, also
    compiles the train step for XLA's memory analysis."""
    from mnemax.trainer.setup import build_program

    program = build_program(recipe)
    mesh_shape = {k: int(v) for k, v in program.mesh.shape.items()}
    summary = {
        "name": recipe.name,
        "recipe": recipe_to_dict(recipe),
        "params": program.param_count,
        "flops_per_token": recipe.model.flops_per_token(recipe.data.seq_len),
        "tokens_per_step": recipe.data.global_batch * recipe.data.seq_len,
        "mesh": mesh_shape,
        "zero_stage": recipe.strategy.zero_stage,
        "memory_per_device": program.memory_per_device(),
        "zero_formula_bytes": zero_formula_bytes(program.param_count, recipe.strategy.zero_stage,
                                                 mesh_shape),
    }
    if compiled:
        summary["compiled_memory_per_device"] = compiled_memory(program)
    return summary


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
    formula = summary["zero_formula_bytes"]
    console.print("  ZeRO formula:     "
                  f"params {_gib(int(formula['params_bytes']))}, grads "
                  f"{_gib(int(formula['grads_bytes']))}, optimizer state "
                  f"{_gib(int(formula['opt_state_bytes']))}")
    if "compiled_memory_per_device" in summary:
        comp = summary["compiled_memory_per_device"]
        console.print("  compiled step:    "
                      f"arguments {_gib(comp['argument_bytes'])} (params + optimizer state + "
                      f"batch), temp {_gib(comp['temp_bytes'])} (gradients + activations), "
                      f"outputs {_gib(comp['output_bytes'])}, aliased {_gib(comp['alias_bytes'])}")
