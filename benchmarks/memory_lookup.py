"""Benchmark of the memory-layer value read: `embedding_bag` forward and forward+backward.

    python benchmarks/memory_lookup.py [--tokens 16384 --heads 4 --k 32 --rows 1048576
        --dim 1024 --dtype bfloat16] [--impls reference,autodiff,pallas] [--cpu-scale]
        [--distributions uniform,zipf]

Index distributions: `uniform` over the rows, and `zipf` (rank r picked with probability
proportional to r^-1.1, ranks placed on rows by a fixed random permutation): skewed usage, where
a few hot rows take a large share of the picks (the case that serialised the old GPU d_table).
The `zipf/uniform` line gives each impl's skewed time over its uniform time (target on a GPU:
within 1.5x).

Impls: `pallas` (the Triton / Mosaic kernels), `reference` (jnp forward, sorted-segment jnp
backward), `autodiff` (XLA autodiff of the jnp reference: the baseline of the "x autodiff"
column). Times are the median of `--iters` runs after warm-up, with `block_until_ready`.

Bytes moved (s = itemsize of the table dtype, M = tokens * heads * k picks):
    forward  = M * (d * s + 8) + T * d * s          (gathered rows, index+weight; output)
    backward = 2 * M * d * s + T * d * s + 16 * M + N * d * s
               (d_weights re-gathers the rows and reads d_out; d_table gathers d_out rows per
                sorted (row, token, weight) triple and writes the whole [N, d] gradient)
GB/s = bytes / time, next to the peak HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s).

On CPU the shape is scaled down (said in the output), the kernels run only in interpret mode at
a tiny shape, for correctness, not timing.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_time

from mnemax.layers.kernels.embedding_bag import embedding_bag, reference

PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12}
CPU_SCALE = dict(tokens=512, heads=4, k=8, rows=1 << 14, dim=256)


def _peak(device) -> float | None:
    return next((bw for name, bw in PEAK_HBM.items() if name in device.device_kind), None)


def _bytes(t, h, k, n, d, itemsize):
    m = t * h * k
    fwd = m * (d * itemsize + 8) + t * d * itemsize
    bwd = 2 * m * d * itemsize + t * d * itemsize + 16 * m + n * d * itemsize
    return fwd, fwd + bwd


def _fns(impl):
    if impl == "autodiff":
        def op(t, i, w):
            return reference(t, i, w)
    else:
        kw = {"reference": "reference", "pallas": "pallas"}[impl]

        def op(t, i, w):
            return embedding_bag(t, i, w, impl=kw)

    def fwd_bwd(t, i, w, g):
        out, vjp = jax.vjp(lambda t, w: op(t, i, w), t, w)
        return (out, *vjp(g))

    return jax.jit(op), jax.jit(fwd_bwd)


def _time(fn, args, iters, warmup=2):
    return median_time(fn, args, iters, warmup)


ZIPF_EXPONENT = 1.1


def zipf_indices(shape: tuple[int, ...], num_rows: int, exponent: float = ZIPF_EXPONENT,
                 seed: int = 0) -> np.ndarray:
    """int32 row indices with `P(rank r) ~ r^-exponent`, ranks on rows by a random permutation."""
    rng = np.random.default_rng(seed)
    p = np.arange(1, num_rows + 1, dtype=np.float64) ** -exponent
    ranks = rng.choice(num_rows, size=shape, p=p / p.sum())
    return rng.permutation(num_rows).astype(np.int32)[ranks]


def _inputs(t, h, k, n, d, dtype, seed=0, distribution="uniform"):
    kt, ki, kw, kg = jax.random.split(jax.random.key(seed), 4)
    table = (jax.random.normal(kt, (n, d), jnp.float32) * 0.02).astype(dtype)
    if distribution == "zipf":
        idx = jnp.asarray(zipf_indices((t, h * k), n, seed=seed))
    else:
        idx = jax.random.randint(ki, (t, h * k), 0, n, jnp.int32)
    w = jax.nn.softmax(jax.random.normal(kw, (t, h * k), jnp.float32), axis=-1)
    g = jax.random.normal(kg, (t, d), jnp.float32).astype(dtype)
    return table, idx, w, g


def _interpret_check(dtype):
    """Kernels in interpret mode vs autodiff of the reference at a tiny shape."""
    table, idx, w, g = _inputs(8, 2, 4, 64, 128, dtype, seed=1, distribution="zipf")
    _, ref = _fns("autodiff")
    want = ref(table, idx, w, g)
    errs = {}
    for backend in ("gpu", "tpu"):
        def op(t, i, w, backend=backend):
            return embedding_bag(t, i, w, impl="pallas_interpret", interpret_backend=backend)

        out, vjp = jax.vjp(lambda t, w, op=op: op(t, idx, w), table, w)
        got = (out, *vjp(g))
        errs[backend] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                            for a, b in zip(got, want, strict=True))
    return errs


def _run(impls, inputs, iters, bytes_fwd, bytes_fb, peak):
    """Times every impl on `inputs = (table, idx, w, g)` and prints one row each."""
    table, idx, w, g = inputs
    results = {}
    for impl in impls:
        fwd, fb = _fns(impl)
        results[impl] = dict(fwd_ms=_time(fwd, (table, idx, w), iters) * 1e3,
                             fwd_bwd_ms=_time(fb, (table, idx, w, g), iters) * 1e3)
    base = results["autodiff"]
    print(f"{'impl':<10} {'fwd ms':>9} {'fwd GB/s':>9} {'%peak':>6} {'fwd+bwd ms':>11} "
          f"{'GB/s':>8} {'%peak':>6} {'x autodiff':>10}")
    for impl, r in results.items():
        r["fwd_gbps"] = bytes_fwd / r["fwd_ms"] / 1e6
        r["fwd_bwd_gbps"] = bytes_fb / r["fwd_bwd_ms"] / 1e6
        r["fwd_bwd_speedup_vs_autodiff"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        pct = (lambda gbps: f"{100 * gbps * 1e9 / peak:5.1f}%" if peak else "   n/a")
        print(f"{impl:<10} {r['fwd_ms']:9.3f} {r['fwd_gbps']:9.1f} {pct(r['fwd_gbps']):>6} "
              f"{r['fwd_bwd_ms']:11.3f} {r['fwd_bwd_gbps']:8.1f} {pct(r['fwd_bwd_gbps']):>6} "
              f"{r['fwd_bwd_speedup_vs_autodiff']:10.2f}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--rows", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--impls", default=None, help="comma list of pallas,reference,autodiff")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--cpu-scale", action="store_true", help="use the scaled-down CPU shape")
    p.add_argument("--distributions", default="uniform,zipf",
                   help="comma list of uniform,zipf (Zipf exponent 1.1)")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    shape = dict(tokens=args.tokens, heads=args.heads, k=args.k, rows=args.rows, dim=args.dim)
    scaled = args.cpu_scale or on_cpu
    if scaled:
        shape = dict(CPU_SCALE)
    impls = (args.impls.split(",") if args.impls
             else ["reference", "autodiff"] if on_cpu else ["pallas", "reference", "autodiff"])
    if "autodiff" not in impls:
        impls.append("autodiff")  # the baseline of the ratio column
    if on_cpu and "pallas" in impls:
        impls.remove("pallas")
        print("pallas: no compiled kernel on CPU; checked in interpret mode below instead")
    distributions = args.distributions.split(",")
    unknown = set(distributions) - {"uniform", "zipf"}
    if unknown:
        p.error(f"--distributions {sorted(unknown)}: use uniform and/or zipf")

    dtype = jnp.dtype(args.dtype)
    t, h, k, n, d = (shape[x] for x in ("tokens", "heads", "k", "rows", "dim"))
    peak = _peak(device)
    print(f"device: {device.device_kind} ({device.platform}); peak HBM: "
          f"{f'{peak / 1e12:.2f} TB/s' if peak else 'n/a'}")
    print(f"shape: tokens={t} heads={h} k={k} rows={n} dim={d} dtype={dtype.name}"
          + (" (SCALED DOWN for CPU; not the target shape)" if scaled else ""))
    bytes_fwd, bytes_fb = _bytes(t, h, k, n, d, dtype.itemsize)

    results = {}
    for dist in distributions:
        table, idx, w, g = _inputs(t, h, k, n, d, dtype, distribution=dist)
        counts = np.bincount(np.asarray(idx).reshape(-1), minlength=n)
        print(f"\n{dist}: hottest row {counts.max()} of {counts.sum()} picks "
              f"({100 * counts.max() / counts.sum():.1f}%), rows used {np.mean(counts > 0):.1%}")
        results[dist] = _run(impls, (table, idx, w, g), args.iters, bytes_fwd, bytes_fb, peak)
    if {"uniform", "zipf"} <= set(results):
        skew, even = results["zipf"], results["uniform"]
        print("\nzipf/uniform (fwd, fwd+bwd time): " + ", ".join(
            f"{impl} {skew[impl]['fwd_ms'] / even[impl]['fwd_ms']:.2f}x"
            f" / {skew[impl]['fwd_bwd_ms'] / even[impl]['fwd_bwd_ms']:.2f}x" for impl in impls))
    interpret = None
    if on_cpu:
        interpret = _interpret_check(dtype)
        print("interpret-mode kernels at tokens=8 heads=2 k=4 rows=64 dim=128, zipf (correctness "
              "only, max |err| vs autodiff over out, d_table, d_weights): "
              + ", ".join(f"{b}={e:.3g}" for b, e in interpret.items()))
    print(json.dumps(dict(device=device.device_kind, platform=device.platform, scaled=scaled,
                          shape=shape, dtype=dtype.name, peak_hbm_bytes_per_s=peak,
                          bytes_fwd=bytes_fwd, bytes_fwd_bwd=bytes_fb, results=results,
                          interpret_max_abs_err=interpret)))
    return results


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
