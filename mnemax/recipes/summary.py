"""What `mnemax show` prints: the resolved recipe, size, FLOPs and memory per device.

The memory figures (by shardings, from the compiled programs with `--compiled`, and the ZeRO
formula) come from `mnemax.trainer.memory_report`; this module gathers them with the recipe
and prints them.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.pretty import Pretty

from mnemax.trainer.memory_report import MOMENT_BYTES, memory_report, zero_formula_bytes
from mnemax.trainer.recipe import Recipe, recipe_to_dict
from mnemax.trainer.setup import build_program


def summarize(recipe: Recipe, *, compiled: bool = False) -> dict[str, Any]:
    """Builds the program abstractly (no device memory) and measures it; with `compiled`, also
    compiles the gradient function and the train step for XLA's memory analysis."""
    program = build_program(recipe)
    mesh_shape = {k: int(v) for k, v in program.mesh.shape.items()}
    strategy = recipe.strategy
    moments = getattr(recipe.optimizer, "moments_dtype", "float32")
    # float8 moments: a float32 scale and exponent per group, for each of the two moments.
    scales = (16.0 / getattr(recipe.optimizer, "moments_group_size", 128)
              if moments.startswith("float8") else 0.0)
    report = memory_report(program, compiled=compiled)
    summary = {
        "name": recipe.name,
        "recipe": recipe_to_dict(recipe),
        "params": program.param_count,
        "flops_per_token": recipe.model.flops_per_token(recipe.data.seq_len),
        "tokens_per_step": recipe.data.global_batch * recipe.data.seq_len,
        "mesh": mesh_shape,
        "zero_stage": strategy.zero_stage,
        "memory_per_device": report["memory_per_device"],
        "zero_formula_bytes": zero_formula_bytes(
            program.param_count, strategy.zero_stage, mesh_shape,
            moment_bytes=MOMENT_BYTES.get(moments, 4),
            offload_optimizer=getattr(strategy, "offload_optimizer", False),
            replicated_opt_bytes_per_param=scales),
    }
    if compiled:
        summary["compiled_memory_per_device"] = report["compiled"]["step"]
        summary["compiled_gradient_memory_per_device"] = report["compiled"]["gradient"]
    return summary


def _gib(n: float) -> str:
    if n >= 2**27:
        return f"{n / 2**30:.3f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def print_summary(summary: dict[str, Any]) -> None:
    """The human-readable form of `summarize`'s result."""
    console = Console(highlight=False, soft_wrap=True)
    console.print(Pretty(summary["recipe"], expand_all=True))
    mem, formula = summary["memory_per_device"], summary["zero_formula_bytes"]
    console.print(f"[bold]{summary['name']}[/bold]")
    console.print(f"  parameters        {summary['params']:,}")
    console.print(f"  FLOPs per token   {summary['flops_per_token']:.4g} (training, fwd+bwd)")
    console.print(f"  tokens per step   {summary['tokens_per_step']:,}")
    console.print(f"  mesh              {summary['mesh']}  (ZeRO stage {summary['zero_stage']})")
    console.print(f"  per device        {'measured':>14}  {'ZeRO formula':>14}")
    grads_note = ("compiled gradient function outputs" if mem["grads_from"] != "shardings"
                  else "by shardings")
    rows = [("parameters", mem["params_bytes"], formula["params_bytes"], "by shardings"),
            ("gradients", mem["grads_bytes"], formula["grads_bytes"], grads_note),
            ("optimizer state", mem["opt_state_bytes"], formula["opt_state_bytes"],
             "by shardings")]
    if "activation_bytes" in mem:
        rows.append(("activations", mem["activation_bytes"], None,
                     "temp of the compiled gradient function on a micro-batch of "
                     f"{mem['micro_batch_rows']} sequences: residuals + workspace"))
    host_opt = mem["host_opt_state_bytes"] or formula.get("host_opt_state_bytes", 0)
    if mem["host_params_bytes"] or host_opt:
        rows.append(("host: opt state", mem["host_opt_state_bytes"],
                     formula.get("host_opt_state_bytes"), "pinned_host memory, not on device"))
    if mem["host_params_bytes"]:
        rows.append(("host: params", mem["host_params_bytes"], None, "pinned_host memory"))
    if mem.get("host_activation_bytes"):
        rows.append(("host: activations", mem["host_activation_bytes"], None,
                     "offloaded residuals"))
    if "step_peak_bytes" in mem:
        rows.append(("step peak", mem["step_peak_bytes"], None,
                     "compiled train step: arguments + temps + outputs - aliased"))
    for label, measured, analytic, note in rows:
        analytic_text = _gib(analytic) if analytic is not None else "-"
        console.print(f"    {label:<15} {_gib(measured):>14}  {analytic_text:>14}  ({note})")
    if "compiled_memory_per_device" in summary:
        comp = summary["compiled_memory_per_device"]
        console.print("  compiled step:    "
                      f"arguments {_gib(comp['argument_bytes'])} (params + optimizer state + "
                      f"batch), temp {_gib(comp['temp_bytes'])} (gradients + activations), "
                      f"outputs {_gib(comp['output_bytes'])}, aliased {_gib(comp['alias_bytes'])}")
