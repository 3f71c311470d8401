"""Memory benchmark: peak device memory and step time under ZeRO stages 0-3 and remat / offload.

    python benchmarks/memory.py                          # dense_1b; on CPU: scaled down
    python benchmarks/memory.py dense_1b --steps 5       # on a GPU: real steps
    python benchmarks/memory.py tiny --configs stage0,stage3,full --full-size

Configurations (`--configs`, default all): `stage0`..`stage3` (the recipe's remat), `none`,
`dots_saveable`, `full`, `offload` (offload_names of the attention and MLP intermediates) and
`opt_offload` (optimizer state in pinned host memory), the last five at the recipe's stage.
Each is reported with its per-device bytes from `mnemax.trainer.memory_report.memory_report`:
params / grads / optimizer state (device and host), activations (temp of the compiled gradient
function) and the compiled step's peak (arguments + temps + outputs - aliased).

On a GPU each configuration also runs in a process of its own (`peak_bytes_in_use` never goes
down within a process): random-token batches, one warm-up step, then the median of `--steps`
synchronised steps; a configuration whose compiled peak exceeds the device's memory is skipped.
On CPU only the compiled memory analysis is reported, on 8 fake devices, with the model scaled
down by `CPU_SCALE` (said in the output; `--full-size` keeps the recipe's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# 8 fake CPU devices; harmless on a GPU (it only concerns the host platform).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# The parent process only looks at the devices; on a GPU it must not reserve the memory that
# its per-configuration child processes measure (they allocate as usual).
_CHILD_ENV = dict(os.environ)
if "--one" not in sys.argv:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
from rich.console import Console  # noqa: E402
from timing import time_train_steps  # noqa: E402

from mnemax.errors import MnemaxError  # noqa: E402
from mnemax.recipes.registry import load_recipe  # noqa: E402
from mnemax.trainer.memory_report import (  # noqa: E402
    analysis_compile,
    compiled_gradient_memory,
    lower_train_step,
    memory_report,
    memory_stats,
    step_peak_bytes,
)
from mnemax.trainer.setup import build_program  # noqa: E402

# dense_1b shrunk to compile in seconds on CPU: 4 x 512, GQA 8/2, 256 tokens, 16 sequences.
CPU_SCALE = ("model.num_layers=4", "model.d_model=512", "model.num_heads=8",
             "model.num_kv_heads=2", "model.mlp_dim=1536", "model.vocab_size=4096",
             "data.seq_len=256", "data.global_batch=16", "run.grad_accum=2")
OFFLOAD_NAMES = "attn_q,attn_k,attn_v,attn_out,mlp_gate,mlp_up,mlp_hidden"


def configurations(recipe) -> dict[str, list[str]]:
    """Label -> the `--set` items selecting that configuration."""
    remat = f"strategy.remat={recipe.strategy.remat}"
    stage = f"strategy.zero_stage={recipe.strategy.zero_stage}"
    configs = {f"stage{s}": [f"strategy.zero_stage={s}", remat] for s in range(4)}
    for label, policy in (("none", "none"), ("dots_saveable", "dots_saveable"),
                          ("full", "full"), ("offload", f"offload_names:{OFFLOAD_NAMES}")):
        configs[label] = [stage, f"strategy.remat={policy}"]
    configs["opt_offload"] = [stage, remat, "strategy.offload_optimizer=true"]
    return configs


def measure(recipe_name: str, overrides: list[str], steps: int = 0) -> dict:
    """Per-device bytes of one configuration from its shardings and compiled programs; with
    `steps`, also runs the compiled step on the devices (peak bytes in use, median time)."""
    try:
        program = build_program(load_recipe(recipe_name, overrides))
        result = memory_report(program)["memory_per_device"]
        grad = compiled_gradient_memory(program)
        lowered = lower_train_step(program)
        compiled = lowered.compile() if steps else analysis_compile(lowered, program)
    except MnemaxError as err:
        return {"error": f"does not build: {err}"}
    except Exception as err:  # the compiler refusing a configuration is a result
        return {"error": f"does not compile: {type(err).__name__}: {str(err).splitlines()[0]}"}
    host_state = result["host_params_bytes"] + result["host_opt_state_bytes"]
    result.update(grads_bytes=grad["output_bytes"], grads_from="compiled gradient function",
                  activation_bytes=grad["temp_bytes"],
                  host_activation_bytes=grad["host_temp_bytes"],
                  step_peak_bytes=step_peak_bytes(memory_stats(compiled), host_state),
                  params=program.param_count, devices=program.mesh.size)
    if steps:
        result.update(run_steps(program, compiled, steps, result["step_peak_bytes"]))
    return result


def run_steps(program, compiled, steps: int, compiled_peak: int) -> dict:
    """Real steps of `compiled` on random tokens: peak bytes in use, median step time."""
    import jax.numpy as jnp

    from mnemax.trainer.hardware import peak_memory_bytes

    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if limit and compiled_peak > limit:
        return {"error": f"skipped: compiled peak {compiled_peak / 2**30:.1f} GiB > device "
                         f"memory {limit / 2**30:.1f} GiB"}
    recipe = program.recipe
    data = recipe.data
    tokens = jax.random.randint(jax.random.key(1), (data.global_batch, data.seq_len + 1), 0,
                                recipe.model.vocab_size, dtype=jnp.int32)
    batch = jax.device_put(tokens, program.batch_sharding)
    try:
        state = program.init(jax.random.key(0))
        _, times = time_train_steps(compiled, state, batch, steps)
    except Exception as err:  # out of memory at run time
        return {"error": f"run failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    step = statistics.median(times)
    return {"step_time_s": step, "tokens_per_sec": data.global_batch * data.seq_len / step,
            "peak_bytes_in_use": peak_memory_bytes()}


def _in_subprocess(recipe_name: str, overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, __file__, recipe_name, "--one", json.dumps(overrides),
           "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_CHILD_ENV)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"process failed ({done.returncode}): {done.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="dense_1b")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--configs", default=None,
                        help="comma list of stage0..stage3,none,dots_saveable,full,offload,"
                             "opt_offload (default: all)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per config (GPU)")
    parser.add_argument("--full-size", action="store_true",
                        help="on CPU too, keep the recipe's shape (slow compiles)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)

    if args.one is not None:
        print(json.dumps(measure(args.recipe, json.loads(args.one), args.steps)))
        return 0

    device = jax.devices()[0]
    on_gpu = device.platform != "cpu"
    scale = [] if (on_gpu or args.full_size) else list(CPU_SCALE)
    base = load_recipe(args.recipe, [*scale, *args.overrides])
    configs = configurations(base)
    wanted = args.configs.split(",") if args.configs else list(configs)
    unknown = [w for w in wanted if w not in configs]
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(configs)}")

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{args.recipe}[/bold] on {jax.device_count()} x {device.device_kind} "
                  f"({device.platform}), mesh {base.strategy.mesh}, ZeRO stage "
                  f"{base.strategy.zero_stage}, remat {base.strategy.remat}")
    if scale:
        console.print("  SCALED DOWN for CPU: --set " + " --set ".join(scale)
                      + "  (--full-size keeps the recipe's shape)")
        console.print("  CPU: XLA's compiled memory analysis only (no steps); XLA:CPU keeps "
                      "pinned_host data in the same memory, so 'offload' saves nothing here")
    if on_gpu and jax.device_count() == 1:
        console.print("  1 device: the ZeRO stages shard over one device, so they coincide")

    results = {}
    for label in wanted:
        overrides = [*scale, *args.overrides, *configs[label]]
        console.print(f"  measuring {label}: {' '.join(configs[label])}", style="dim")
        results[label] = (_in_subprocess(args.recipe, overrides, args.steps) if on_gpu
                          else measure(args.recipe, overrides))
        results[label]["overrides"] = configs[label]

    header = (f"  {'config':<14}{'params':>10}{'grads':>10}{'opt':>10}{'host':>10}"
              f"{'activ.':>10}{'step peak':>11}")
    if on_gpu:
        header += f"{'in use':>10}{'step ms':>10}{'tokens/s':>11}"
    console.print(header + "   (MiB per device)")
    for label, r in results.items():
        if "params_bytes" not in r:
            console.print(f"  {label:<14}{r['error']}")
            continue
        host = r["host_opt_state_bytes"] + r["host_params_bytes"] + r["host_activation_bytes"]
        line = (f"  {label:<14}{_mib(r['params_bytes']):>10}{_mib(r['grads_bytes']):>10}"
                f"{_mib(r['opt_state_bytes']):>10}{_mib(host):>10}"
                f"{_mib(r['activation_bytes']):>10}{_mib(r['step_peak_bytes']):>11}")
        if on_gpu:
            if "step_time_s" in r:
                line += (f"{_mib(r['peak_bytes_in_use']):>10}{1e3 * r['step_time_s']:>10.1f}"
                         f"{r['tokens_per_sec']:>11,.0f}")
            else:
                line += f"  {r.get('error', '')}"
        console.print(line)
    print(json.dumps({"recipe": args.recipe, "device": device.device_kind,
                      "platform": device.platform, "devices": jax.device_count(),
                      "scaled_down": scale, "overrides": args.overrides, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
