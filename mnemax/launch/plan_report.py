"""How `mnemax plan` prints its result: the chosen configuration, the constants behind the
estimates, and a table of every candidate tried."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mnemax.launch.plan import PlanResult
from mnemax.launch.plan_cost import MATMUL_EFFICIENCY, format_bytes, format_seconds


def _remat(spec: str) -> str:
    kind, _, names = spec.partition(":")
    return f"{kind}({len(names.split(','))})" if names else kind


def _order(row: dict) -> tuple:
    """Fastest estimate first; rows without an estimate (rejected early) last."""
    return (row["est_step_s"] is None, row["est_step_s"] or 0.0, row["grad_accum"],
            row["est_peak_bytes"] or 0)


def print_plan(result: PlanResult, recipe_name: str, console: Console | None = None) -> None:
    """Chosen configuration, constants, notes, then the table (fastest estimate first)."""
    if console is None:
        console = Console(highlight=False, soft_wrap=True)
        if not console.is_terminal:  # files and pipes get whole rows, not 80 columns
            console = Console(highlight=False, soft_wrap=True, width=200)
    hw = result.hardware
    where = f" ({result.topology})" if result.topology else ""
    console.print(f"[bold]plan for {recipe_name}[/bold] on {result.devices} x {hw.kind}{where}, "
                  f"{format_bytes(result.budget_bytes)} per device, candidates must fit in "
                  f"{format_bytes(result.usable_bytes)}")
    best = result.best
    if best is not None:
        console.print(
            f"  chosen: ZeRO stage {best['zero_stage']}, remat {best['remat']}, optimizer "
            f"offload {'on' if best['offload_optimizer'] else 'off'}, grad_accum "
            f"{best['grad_accum']}, mesh {best['mesh']}")
        console.print(
            f"          peak {format_bytes(best['peak_bytes'])} per device (compiled), est. step "
            f"{format_seconds(best['est_step_s'])} = compute {format_seconds(best['compute_s'])}"
            f" + collectives {format_seconds(best['collective_s'])} + host transfers "
            f"{format_seconds(best['host_s'])}"
            + (f"; TPU compiler's estimate {format_seconds(best['compiled_step_s'])}"
               if best.get("compiled_step_s") is not None else ""))
        sets = [f"strategy.zero_stage={best['zero_stage']}", f"strategy.remat={best['remat']}",
                f"strategy.offload_optimizer={str(best['offload_optimizer']).lower()}",
                f"run.grad_accum={best['grad_accum']}", f"strategy.mesh={best['mesh']}"]
        console.print("  use:    " + " ".join(f"--set {s}" for s in sets))
    console.print(
        f"  step time model: {hw.peak_flops / 1e12:.0f} TFLOP/s peak x {MATMUL_EFFICIENCY} "
        f"efficiency; ring collectives at {hw.intra_node_bytes_per_s / 1e9:.0f} GB/s within "
        + ("the slice (ICI)" if hw.platform == "tpu" else
           f"{hw.node_size}-device nodes, {hw.inter_node_bytes_per_s / 1e9:.0f} GB/s between "
           "nodes")
        + f"; host offload at {hw.host_bytes_per_s / 1e9:.0f} GB/s (PCIe); compute, "
        "communication and transfers added up (no overlap)")
    for note in result.notes:
        console.print(f"  {note}")
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in (("stage", "right"), ("remat", "left"), ("opt@host", "left"),
                          ("accum", "right"), ("mesh", "left"), ("fits", "left"),
                          ("peak/device", "right"), ("host", "right"), ("est. step", "right"),
                          *((("compiler est.", "right"),) if result.topology else ()),
                          ("", "left")):
        table.add_column(name, justify=justify)
    for row in sorted(result.rows, key=_order):
        if row["peak_bytes"] is not None:
            peak = format_bytes(row["peak_bytes"])
        elif row["est_peak_bytes"] is not None:
            peak = "~" + format_bytes(row["est_peak_bytes"])
        else:
            peak = "-"
        fits = {True: "yes", False: "no", None: "?"}[row["fits"]]
        table.add_row(
            str(row["zero_stage"]), _remat(row["remat"]),
            "yes" if row["offload_optimizer"] else "no", str(row["grad_accum"]), row["mesh"],
            fits, peak, format_bytes(row["host_bytes"]) if row["host_bytes"] else "-",
            format_seconds(row["est_step_s"]) if row["est_step_s"] is not None else "-",
            *((format_seconds(row["compiled_step_s"]) if row.get("compiled_step_s") else "-",)
              if result.topology else ()),
            row["status"], style="bold" if row["chosen"] else None)
    console.print(table)
    console.print("  peak: compiled train step (arguments + temps + outputs - aliased); "
                  "~: estimate (state + gradients + residuals), not compiled")
