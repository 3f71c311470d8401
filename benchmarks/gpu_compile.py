"""Every Pallas Triton kernel of mnemax compiled for H100/H200 (sm_90a) on this host, no GPU needed.

    python benchmarks/gpu_compile.py [--kernel gated_delta] [--json]

One row per Pallas call of each kernel and production shape (`triton_compile.production_cases`;
d_table makes one call per level of its segmented reduction): the warps and pipeline stages the
kernel is configured with, the launch grid, and what `ptxas -v` reports for the cubin Triton
builds: registers per thread, spill stores / loads and stack frame (bytes per thread; anything
but 0 means local-memory traffic in the inner loop), and the dynamic shared memory per program
(limit 227 KiB on an H100). `compile s` is the whole case's. Compiling is not timing: speed
needs a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mnemax.layers.kernels.triton_compile import compile_kernels_sm90, production_cases

COLUMNS = ("kernel", "shape", "warps", "stages", "grid", "registers", "spill st/ld B",
           "stack B", "shared KiB", "compile s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    rows = []
    for case in production_cases():
        if args.kernel not in case.kernel:
            continue
        start = time.perf_counter()
        kernels = compile_kernels_sm90(case.fn, *case.args)  # several: d_table's levels
        seconds = time.perf_counter() - start
        for kernel in kernels:
            if args.json:
                record = {k: v for k, v in dataclasses.asdict(kernel).items() if k != "ptx"}
                print(json.dumps({**record, "kernel": case.kernel, "shape": case.shape,
                                  "compile_s": round(seconds, 2)}))
                continue
            rows.append((case.kernel, case.shape, kernel.num_warps, kernel.num_stages,
                         "x".join(map(str, kernel.grid)), kernel.registers,
                         f"{kernel.spill_store_bytes}/{kernel.spill_load_bytes}",
                         kernel.stack_bytes, f"{kernel.shared_bytes / 1024:.1f}",
                         f"{seconds:.1f}"))
    if rows:
        widths = [max(len(str(r[i])) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
