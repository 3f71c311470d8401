"""Per-device memory of a train program, from three sources side by side.

- the shardings of the train state (params, gradients and optimizer state exactly, split into
  device and host memory by each sharding's `memory_kind`; `mnemax.parallel.sharding.
  bytes_per_device` counts them);
- XLA's memory analysis of two compiled programs built from abstract inputs (nothing is
  allocated): a gradient function (`jax.grad` of the recipe's loss on one micro-batch, with the
  train step's in/out shardings), whose outputs are the gradients one device holds and whose
  temp buffer is the activations (residuals kept for the backward pass + workspace), and the
  whole train step, whose peak is arguments + temps + outputs - aliased;
- the analytic ZeRO formula (Rajbhandari et al. 2020).

`mnemax show` prints these (`mnemax.recipes.summary`) and the planner (`mnemax.launch.
plan_worker`) measures its candidates with them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mnemax.parallel.sharding import bytes_per_device
from mnemax.trainer.checkpoint import abstract_with_shardings
from mnemax.trainer.recipe import Recipe
from mnemax.trainer.setup import TrainProgram

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


def state_bytes(program: TrainProgram) -> dict[str, int]:
    """Bytes per device of params, gradients and optimizer state by their shardings, with what
    sits in host memory (`memory_kind` pinned_host) reported apart from device memory."""
    state, shardings = program.abstract_state, program.state_shardings
    params, host_params = bytes_per_device(state.params, shardings.params)
    grads, _ = bytes_per_device(state.params, program.grad_shardings)
    opt, host_opt = bytes_per_device(state.opt_state, shardings.opt_state)
    return {"params_bytes": params, "grads_bytes": grads, "opt_state_bytes": opt,
            "host_params_bytes": host_params, "host_opt_state_bytes": host_opt}


def micro_batch_rows(recipe: Recipe) -> int:
    """Sequences in one micro-batch: `data.global_batch / run.grad_accum`."""
    return recipe.data.global_batch // max(recipe.run.grad_accum, 1)


def analysis_compile(lowered: Any, program: TrainProgram) -> Any:
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


def compiled_gradient_memory(program: TrainProgram) -> dict[str, int]:
    """XLA's per-device bytes for `jax.grad` of the loss on one micro-batch `[rows, seq_len]`,
    with the params' shardings in and the gradients' shardings out (ZeRO 2 and 3 reduce-scatter):
    outputs = this device's gradients, temp = activations (residuals + workspace)."""
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


def lower_train_step(program: TrainProgram) -> Any:
    """The train step lowered for abstract state and batch with their shardings (`.compile()`
    gives a callable for real state and batches)."""
    state = abstract_with_shardings(program.abstract_state, program.state_shardings)
    data = program.recipe.data
    batch = jax.ShapeDtypeStruct((data.global_batch, data.seq_len + 1), jnp.int32,
                                 sharding=program.batch_sharding)
    return program.train_step.lower(state, batch)


def compiled_memory(program: TrainProgram) -> dict[str, int]:
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


def memory_report(program: TrainProgram, *, compiled: bool = False) -> dict[str, Any]:
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
