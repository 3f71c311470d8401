"""The TPU compiler's step estimate of a recipe's train step, compiled on any machine.

    python benchmarks/tpu_step_estimate.py dense_1b --topology v5p:2x2x1 \\
        --set model.scan_layers=false --set model.attention_impl=xla --set run.grad_accum=1
    python benchmarks/tpu_step_estimate.py dense_1b --set model.num_layers=2 \\
        --set data.global_batch=32 --hlo /tmp/step.hlo        # a small variant, HLO dumped

Compiles the real train step (`build_program` + `lower_train_step`) for a libtpu compile-only
topology and prints, per chip, XLA's `cost_analysis()` (`optimal_seconds`: the compiler's step
estimate; `flops`; `bytes accessed`) and `memory_analysis()`. The estimate counts a while-loop
body once, so compare unrolled programs (`model.scan_layers=false`, `run.grad_accum=1`);
custom calls (Pallas kernels) are not in it. `--hlo` writes the optimized HLO
(`compiled.as_text()`) for a per-op comparison; `--top N` lists the N top-level ops of the
optimized program that move the most bytes (operands + outputs): on TPU the estimate is close
to flops / peak + bytes / HBM bandwidth, so the big movers are where the time goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from typing import Any

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jax.experimental import topologies

from mnemax.recipes.registry import load_recipe
from mnemax.trainer.memory_report import lower_train_step, memory_stats
from mnemax.trainer.setup import build_program

GIB = 2**30
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
# "%name = shape op(%operand, ...), attributes" in the ENTRY computation.
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)")
FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a shape or a tuple of shapes)."""
    return sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in SHAPE.findall(text))


def top_byte_movers(hlo: str, count: int) -> list[tuple[int, str, str, str]]:
    """The `count` top-level ops of the ENTRY computation of an optimized HLO module that read
    and write the most bytes: (bytes, name, op, output shape), largest first. Operands are
    counted whole (an op that reads a slice of one is over-counted)."""
    body = hlo[hlo.index("\nENTRY"):]
    body = body[:body.index("\n}")]
    sizes: dict[str, int] = {}
    moves = []
    for line in body.splitlines()[1:]:
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, operands = match.groups()
        sizes[name] = shape_bytes(shape)
        if op not in FREE_OPS:
            read = sum(sizes.get(o, 0) for o in re.findall(r"%[\w.\-]+", operands))
            moves.append((read + sizes[name], name, op, shape))
    return sorted(moves, reverse=True)[:count]


def cost_summary(compiled: Any) -> dict[str, float]:
    """`optimal_seconds`, `flops` and `bytes accessed` per chip (cost_analysis is a dict on
    recent jax and a one-element list of dicts on older ones)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return {key: float(cost.get(key, float("nan")))
            for key in ("optimal_seconds", "flops", "bytes accessed")}


def estimate(recipe_name: str, overrides: list[str], topology: str,
             hlo_path: str | None = None, top: int = 0) -> dict[str, Any]:
    """Compiles the recipe's train step for `topology`; its per-chip cost and memory (and the
    `top` ops that move the most bytes)."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    program = build_program(load_recipe(recipe_name, overrides), devices=devices)
    t0 = time.perf_counter()
    compiled = lower_train_step(program).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text() if hlo_path or top else ""
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    return {"recipe": recipe_name, "overrides": overrides, "topology": topology,
            "chips": len(devices), "compile_s": round(compile_s, 1),
            **cost_summary(compiled), **memory_stats(compiled),
            "top_byte_movers": top_byte_movers(hlo, top) if top else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE")
    parser.add_argument("--hlo", help="write the optimized HLO here")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="list the N ops that move the most bytes")
    args = parser.parse_args()
    result = estimate(args.recipe, args.overrides, args.topology, args.hlo, args.top)
    print(f"{args.recipe} on {args.topology} ({result['chips']} chips), "
          f"compiled in {result['compile_s']} s")
    print(f"  step estimate  {result['optimal_seconds']:.4f} s")
    print(f"  flops / chip   {result['flops'] / 1e12:.2f} TFLOP")
    print(f"  bytes / chip   {result['bytes accessed'] / GIB:.2f} GiB accessed")
    for kind in ("argument", "temp", "output", "alias"):
        print(f"  {kind:<14} {result[f'{kind}_bytes'] / GIB:.2f} GiB")
    for moved, name, op, shape in result.pop("top_byte_movers"):
        print(f"  {moved / GIB:8.2f} GiB  {name:<32} {op:<12} {shape[:70]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
