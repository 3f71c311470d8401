"""What `mnemax show` prints: the resolved recipe, size, FLOPs and memory per device.

Memory per device comes from three sources, side by side:
- the shardings of the train state (params and optimizer state exactly, split into device and
  host memory by each sharding's `memory_kind`);
- with `--compiled`, XLA's memory analysis of two compiled programs built from abstract inputs
  (nothing is allocated): a gradient function (`jax.grad` of the recipe's loss on one
  micro-batch, with the train step's in/out shardings), whose outputs are the gradients one
  device holds and whose temp buffer is the activations (residuals kept for the backward pass +
  workspace), and the whole train step, whose peak is arguments + temps + outputs - aliased;
- the analytic ZeRO formula (Rajbhandari et al. 2020).
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.pretty import Pretty

from mnemax.recipes.schema import Recipe, recipe_to_dict

HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")
# Options of compiles that only feed the memory analysis on CPU: buffer assignment comes before
# LLVM code generation, so skipping LLVM's optimisations halves the compile time and changes
# none of the figures.
CPU_ANALYSIS_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}
# Bytes per element of Adam's moments by `optimizer.moments_dtype` (float8 group scales ignored).
MOMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3": 1, "float8_e4m3fn": 1,
                "float8_e5m2": 1}


def zero_formula_bytes(params: int, stage: int, mesh_shape: dict[str, int], *,
                       moment_bytes: int = 4, offload_optimizer: bool = False,
                       replicated_opt_bytes_per_param: float = 0.0) -> dict[str, float]:
    """ZeRO's per-device model-state bytes with fp32 params and grads and Adam's two moments
    (Rajbhandari et al. 2020 with K = 8 for fp32 moments), N = data x fsdp (every
    data-parallel device), F = fsdp: stage 0: 16 Psi; 1: 8 Psi + 8 Psi / N;
    2: 4 Psi + 12 Psi / N; 3: 4 Psi / F + 12 Psi / N (parameters split over fsdp only, gradients
    and moments over all N, as `mnemax.parallel.zero.zero_layout` lays them out).

    With a `tensor` axis of size T > 1 every term is divided by T too (tensor parallelism splits
    the weights, hence their gradients and moments; the few replicated norms are ignored).
    `moment_bytes` is the size of one moment element (2 for bfloat16, 1 for float8 moments);
    `replicated_opt_bytes_per_param` is optimizer state every device keeps whole (float8 moments'
    per-group scales and exponents); with `offload_optimizer` the optimizer state is counted in
    `host_opt_state_bytes` instead.
    """
    n = mesh_shape["data"] * mesh_shape["fsdp"]
    t = mesh_shape.get("tensor", 1)
    p, g, o = 4.0 * params / t, 4.0 * params / t, 2.0 * moment_bytes * params / t
    if stage >= 1:
        o /= n
    if stage >= 2:
        g /= n
    if stage >= 3:
        p /= mesh_shape["fsdp"]
    o += replicated_opt_bytes_per_param * params
    host = 0.0
    if offload_optimizer:
        host, o = o, 0.0
    return {"params_bytes": p, "grads_bytes": g, "opt_state_bytes": o,
            "host_opt_state_bytes": host}


def _leaf_bytes(tree: Any, shardings: Any) -> tuple[int, int]:
    """(device bytes, host bytes) one device holds of `tree` laid out by `shardings`."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    device = host = 0
    flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for leaf, sharding in zip(jax.tree.leaves(tree), flat, strict=True):
        size = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if sharding.memory_kind in HOST_MEMORY_KINDS:
            host += size
        else:
            device += size
    return device, host


def state_bytes(program: Any) -> dict[str, int]:
    """Bytes per device of params, gradients and optimizer state by their shardings, with what
    sits in host memory (`memory_kind` pinned_host) reported apart from device memory."""
    state, shardings = program.abstract_state, program.state_shardings
    params, host_params = _leaf_bytes(state.params, shardings.params)
    grads, _ = _leaf_bytes(state.params, program.grad_shardings)
    opt, host_opt = _leaf_bytes(state.opt_state, shardings.opt_state)
    return {"params_bytes": params, "grads_bytes": grads, "opt_state_bytes": opt,
            "host_params_bytes": host_params, "host_opt_state_bytes": host_opt}


def micro_batch_rows(recipe: Recipe) -> int:
    """Sequences in one micro-batch: `data.global_batch / run.grad_accum`."""
    return recipe.data.global_batch // max(recipe.run.grad_accum, 1)


def analysis_compile(lowered: Any, program: Any) -> Any:
    """Compiles `lowered` whose result only feeds `memory_stats` (on CPU: without LLVM's
    optimisations, see `CPU_ANALYSIS_OPTIONS`)."""
    on_cpu = program.mesh.devices.flat[0].platform == "cpu"
    return lowered.compile(CPU_ANALYSIS_OPTIONS if on_cpu else None)


def memory_stats(compiled: Any) -> dict[str, int]:
    """Argument / output / alias / temp bytes per device of a compiled program, and the
    host-memory parts XLA reports apart (`host_*`)."""
    stats = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp")
    out = {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
    out.update({f"host_{n}_bytes": int(getattr(stats, f"host_{n}_size_in_bytes", 0) or 0)
                for n in names})
    return out


def compiled_gradient_memory(program: Any) -> dict[str, int]:
    """XLA's per-device bytes for `jax.grad` of the loss on one micro-batch `[rows, seq_len]`,
    with the params' shardings in and the gradients' shardings out (ZeRO 2 and 3 reduce-scatter):
    outputs = this device's gradients, temp = activations (residuals + workspace)."""
    import jax
    import jax.numpy as jnp

    from mnemax.trainer.checkpoint import abstract_with_shardings

    loss_fn = program.loss_fn
    shardings = program.state_shardings.params

    def grads(params, inputs, targets):
        return jax.grad(lambda p: loss_fn(p, inputs, targets)[0])(params)

    params = abstract_with_shardings(program.abstract_state.params, shardings)
    rows, seq_len = micro_batch_rows(program.recipe), program.recipe.data.seq_len
    tokens = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=program.batch_sharding)
    with jax.set_mesh(program.mesh):
        jitted = jax.jit(grads, in_shardings=(shardings, program.batch_sharding,
                                              program.batch_sharding),
                         out_shardings=program.grad_shardings)
        lowered = jitted.lower(params, tokens, tokens)
    return memory_stats(analysis_compile(lowered, program))


def lower_train_step(program: Any) -> Any:
    """The train step lowered for abstract state and batch with their shardings (`.compile()`
    gives a callable for real state and batches)."""
    import jax

    from mnemax.trainer.checkpoint import abstract_with_shardings

    state = abstract_with_shardings(program.abstract_state, program.state_shardings)
    data = program.recipe.data
    batch = jax.ShapeDtypeStruct((data.global_batch, data.seq_len + 1), jax.numpy.int32,
                                 sharding=program.batch_sharding)
    return program.train_step.lower(state, batch)


def compiled_memory(program: Any) -> dict[str, int]:
    """Per-device bytes XLA reports for the compiled train step (compiled from abstract
    inputs: nothing is allocated). Arguments = params + optimizer state + batch; temp holds the
    gradients, activations and workspace."""
    return memory_stats(analysis_compile(lower_train_step(program), program))


def step_peak_bytes(stats: dict[str, int], host_state_bytes: int) -> int:
    """Device bytes live at the step's peak: arguments + temps + outputs - aliased (donated
    state). Where XLA does not split host memory out (XLA:CPU has one memory and reports
    host-placed state as arguments), the host-placed state is taken off."""
    peak = (stats["argument_bytes"] + stats["temp_bytes"] + stats["output_bytes"]
            - stats["alias_bytes"])
    if stats.get("host_argument_bytes", 0) == 0:
        peak -= host_state_bytes
    return peak


def memory_report(program: Any, *, compiled: bool = False) -> dict[str, Any]:
    """Per-device bytes: params / grads / optimizer state (device and host) by shardings and,
    with `compiled`, gradients and activations from the compiled gradient function and the
    step's peak from the compiled train step."""
    report: dict[str, Any] = {**state_bytes(program), "grads_from": "shardings"}
    raw: dict[str, Any] = {}
    if compiled:
        grad_stats = compiled_gradient_memory(program)
        step_stats = compiled_memory(program)
        host_state = report["host_params_bytes"] + report["host_opt_state_bytes"]
        report.update(
            grads_bytes=grad_stats["output_bytes"],
            grads_from="compiled gradient function",
            activation_bytes=grad_stats["temp_bytes"],
            host_activation_bytes=grad_stats["host_temp_bytes"],
            step_peak_bytes=step_peak_bytes(step_stats, host_state),
            micro_batch_rows=micro_batch_rows(program.recipe),
        )
        raw = {"step": step_stats, "gradient": grad_stats}
    return {"memory_per_device": report, **({"compiled": raw} if raw else {})}


def summarize(recipe: Recipe, *, compiled: bool = False) -> dict[str, Any]:
    """Builds the program abstractly (no device memory) and measures it; with `compiled`, also
    compiles the gradient function and the train step for XLA's memory analysis."""
    from mnemax.trainer.setup import build_program

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
