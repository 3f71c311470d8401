"""Train-step benchmark: compile time, step time, tokens/s, MFU, peak memory, loop overhead.

    python benchmarks/train_step.py tiny                       # CPU, as shipped
    python benchmarks/train_step.py dense_1b --steps 20        # on a GPU
    python benchmarks/train_step.py tiny --set data.global_batch=8 --loop-steps 40

Two measurements on the same recipe:
1. the bare jitted `train_step` on one fixed batch (median of `--steps` timed steps, each
   synchronised), after timing `lower()` + `compile()` separately;
2. `mnemax train` itself (data pipeline, metrics, console, async checkpoints every
   `--ckpt-every` steps) for `--loop-steps` steps in a temporary run dir; its steady time per
   step is the mean of the `step_time_s` the loop logs (the first, compiling, step excluded).
Overhead = loop step time / bare step time - 1 (target <= 5%). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from rich.console import Console
from timing import time_train_steps

from mnemax.recipes.registry import load_recipe
from mnemax.trainer.data import train_iterator
from mnemax.trainer.hardware import peak_flops_per_device, peak_memory_bytes
from mnemax.trainer.loop import train
from mnemax.trainer.setup import build_program


def bare_step(recipe, steps: int) -> dict:
    program = build_program(recipe)
    state = program.init(jax.random.key(0))
    batch = program.global_batch(next(train_iterator(recipe.data)))
    t0 = time.perf_counter()
    lowered = program.train_step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    analysis = compiled.memory_analysis()
    state, times = time_train_steps(compiled, state, batch, steps)
    step_time = statistics.median(times)
    tokens = recipe.data.global_batch * recipe.data.seq_len
    flops = recipe.model.flops_per_token(recipe.data.seq_len) * tokens
    peak = recipe.run.peak_flops_per_device or peak_flops_per_device()
    compiled_bytes = None
    if analysis is not None:
        compiled_bytes = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return {
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "tokens_per_sec": tokens / step_time,
        "mfu": flops / step_time / (peak * program.mesh.size),
        "peak_memory_bytes": peak_memory_bytes(),
        "compiled_memory_bytes": compiled_bytes,
        "params": program.param_count,
    }


def loop_step(recipe, loop_steps: int, ckpt_every: int, log_every: int) -> dict:
    recipe = _with_loop_settings(recipe, loop_steps, ckpt_every, log_every)
    with tempfile.TemporaryDirectory() as tmp:
        train(recipe, tmp, console=Console(quiet=True))
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text()
                   .splitlines()]
    timed = [r["step_time_s"] for r in records if "step_time_s" in r]
    return {"loop_step_time_s": statistics.mean(timed), "loop_intervals": len(timed)}


def _with_loop_settings(recipe, loop_steps, ckpt_every, log_every):
    return dataclasses.replace(
        recipe,
        run=dataclasses.replace(recipe.run, steps=loop_steps, log_every=log_every),
        checkpoint=dataclasses.replace(recipe.checkpoint, every=ckpt_every),
        eval=dataclasses.replace(recipe.eval, every=0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10, help="timed bare steps")
    parser.add_argument("--loop-steps", type=int, default=41,
                        help="steps of the real loop (0 skips the overhead measurement)")
    parser.add_argument("--ckpt-every", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.overrides)
    device = jax.devices()[0]
    result = {"recipe": recipe.name, "overrides": args.overrides,
              "device": f"{jax.device_count()} x {device.device_kind} ({device.platform})",
              **bare_step(recipe, args.steps)}
    if args.loop_steps:
        result.update(loop_step(recipe, args.loop_steps, args.ckpt_every, args.log_every))
        result["loop_overhead"] = result["loop_step_time_s"] / result["step_time_s"] - 1

    console = Console(highlight=False)
    console.print(f"[bold]{recipe.name}[/bold] on {result['device']}, "
                  f"{result['params']:,} params")
    console.print(f"  trace+lower       {result['trace_lower_s']:.2f} s")
    console.print(f"  compile           {result['compile_s']:.2f} s")
    console.print(f"  step (median)     {1e3 * result['step_time_s']:.1f} ms")
    console.print(f"  tokens/s          {result['tokens_per_sec']:,.0f}")
    console.print(f"  MFU               {100 * result['mfu']:.1f}%")
    if result["peak_memory_bytes"] is not None:
        console.print(f"  peak memory       {result['peak_memory_bytes'] / 2**30:.2f} GiB")
    if result["compiled_memory_bytes"] is not None:
        console.print(f"  compiled memory   {result['compiled_memory_bytes'] / 2**20:.1f} MiB "
                      "(args + outputs + temps - aliased)")
    if "loop_overhead" in result:
        console.print(f"  loop step         {1e3 * result['loop_step_time_s']:.1f} ms "
                      f"(mnemax train, {args.loop_steps} steps, ckpt every {args.ckpt_every})")
        console.print(f"  loop overhead     {100 * result['loop_overhead']:+.1f}% (target <= 5%)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
