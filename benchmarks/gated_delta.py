"""Benchmark of the gated delta rule op: forward and forward+backward time, tokens/s, memory.

    python benchmarks/gated_delta.py [--batch 8 --heads 16 --dim 128 --times 2048,8192
        --dtype bfloat16] [--impls chunk,recurrent,attention] [--iters 5] [--cpu-scale]

Impls (rows of the table): `chunk` (the chunkwise-parallel form in XLA, what `impl="auto"` runs:
`impl="reference", form="chunk"`), `recurrent` (the `lax.scan` over time: `form="recurrent"`),
`pallas` (the chunk form with its scan over chunks in the Triton kernel: `impl="pallas"`; GPU
only by default),
`attention` (`jax.nn.dot_product_attention`, causal, cuDNN where available, at the same
[batch, time, heads, dim] shape; GPU only, for comparison). Gradients flow to all five inputs
(q, k, v, g, beta; q, k, v for attention). Times are the median of `--iters` runs after warm-up,
with `block_until_ready`; tokens/s = batch * time / fwd+bwd time. Memory is XLA's compiled temp
buffer size of the jitted fwd+bwd (`compile().memory_analysis()`); an impl whose temp memory would
not fit the device is reported and skipped, not run.

On CPU the shape is scaled down (said in the output): batch=1, heads=2, dim=64, time=2048.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from timing import median_time

from mnemax.layers.kernels.gated_delta import gated_delta_rule

CPU_SCALE = dict(batch=1, heads=2, dim=64, times=(2048,))


def _inputs(b, t, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(ks[0], (b, t, h, d)))
    k = unit(jax.random.normal(ks[1], (b, t, h, d)))
    v = jax.random.normal(ks[2], (b, t, h, d))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h)) - 2.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    do = jax.random.normal(ks[5], (b, t, h, d))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta, do))


def _attention(q, k, v):
    try:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    except Exception:  # cuDNN unavailable for this shape/dtype/platform: XLA's attention
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)


# The `gated_delta_rule` arguments of each row.
METHODS = {"chunk": dict(impl="reference", form="chunk"),
           "recurrent": dict(impl="reference", form="recurrent"),
           "pallas": dict(impl="pallas", form="chunk")}


def _op(impl):
    """(op over the differentiable inputs, number of them): `op(*inputs) -> o`."""
    if impl == "attention":
        return _attention, 3

    def op(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, **METHODS[impl])[0]

    return op, 5


def _fns(impl):
    op, n = _op(impl)

    def fwd_bwd(*args):
        out, vjp = jax.vjp(op, *args[:n])
        return (out, *vjp(args[-1]))

    return jax.jit(lambda *a: op(*a[:n])), jax.jit(fwd_bwd)


def _time(fn, args, iters, warmup=1):
    return median_time(fn, args, iters, warmup)


def _device_bytes(device) -> int | None:
    try:
        return device.memory_stats()["bytes_limit"]
    except Exception:  # CPU has no memory_stats
        return None


def _bench(impl, shape, dtype, iters, limit):
    b, t, h, d = shape
    inputs = _inputs(b, t, h, d, dtype)
    fwd, fb = _fns(impl)
    try:
        compiled = fb.lower(*inputs).compile()
    except Exception as e:  # e.g. cuDNN or the compiler refusing a shape
        return dict(error=f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    r = dict(fwd_bwd_temp_bytes=temp)
    if limit is not None and temp is not None and temp > 0.9 * limit:
        r["error"] = f"skipped: needs {temp / 2**30:.1f} GiB temp, device has {limit / 2**30:.1f}"
        return r
    try:
        r["fwd_ms"] = _time(fwd, inputs, iters) * 1e3
        r["fwd_bwd_ms"] = _time(compiled, inputs, iters) * 1e3
    except Exception as e:  # out of memory at run time
        r["error"] = f"run failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return r
    r["fwd_bwd_tokens_per_s"] = b * t / (r["fwd_bwd_ms"] / 1e3)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--times", default="2048,8192", help="comma list of sequence lengths")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--impls", default=None, help="comma list of chunk,recurrent,pallas,attention")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--cpu-scale", action="store_true", help="use the scaled-down CPU shape")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    scaled = args.cpu_scale or on_cpu
    b, h, d = (CPU_SCALE[x] for x in ("batch", "heads", "dim")) if scaled else (
        args.batch, args.heads, args.dim)
    times = CPU_SCALE["times"] if scaled else tuple(int(t) for t in args.times.split(","))
    impls = (args.impls.split(",") if args.impls
             else ["chunk", "recurrent"] + ([] if on_cpu else ["pallas", "attention"]))
    notes = []
    if on_cpu and "pallas" in impls:
        notes.append("pallas: on CPU this is the Triton kernel in interpret mode (not a timing)")
    if on_cpu and "attention" in impls:
        impls.remove("attention")
        notes.append("attention: GPU-only comparison; skipped on CPU")
    dtype = jnp.dtype(args.dtype)
    limit = _device_bytes(device)

    print(f"device: {device.device_kind} ({device.platform})")
    print(f"shape: batch={b} heads={h} d_k=d_v={d} time={','.join(map(str, times))} "
          f"dtype={dtype.name}" + (" (SCALED DOWN for CPU; the target shape is batch=8 "
                                   "heads=16 dim=128 time=2048,8192)" if scaled else ""))
    for note in notes:
        print(note)

    results = {}
    for t in times:
        for impl in impls:
            results[f"{impl}@{t}"] = dict(impl=impl, time=t,
                                          **_bench(impl, (b, t, h, d), dtype, args.iters, limit))
    print(f"{'impl':<10} {'time':>6} {'fwd ms':>10} {'fwd+bwd ms':>11} {'tokens/s':>11} "
          f"{'fwd+bwd temp MiB':>17}")
    for r in results.values():
        temp = r.get("fwd_bwd_temp_bytes")
        temp = f"{temp / 2**20:17.1f}" if temp is not None else f"{'n/a':>17}"
        if "fwd_bwd_ms" in r:
            print(f"{r['impl']:<10} {r['time']:>6} {r['fwd_ms']:10.2f} {r['fwd_bwd_ms']:11.2f} "
                  f"{r['fwd_bwd_tokens_per_s']:11.0f} {temp}")
        else:
            print(f"{r['impl']:<10} {r['time']:>6} {r['error']}  (temp MiB {temp.strip()})")
    for t in times:
        c, rec = results.get(f"chunk@{t}", {}), results.get(f"recurrent@{t}", {})
        if "fwd_bwd_ms" in c and "fwd_bwd_ms" in rec:
            print(f"time={t}: chunk is {rec['fwd_bwd_ms'] / c['fwd_bwd_ms']:.1f}x faster than "
                  f"recurrent (fwd+bwd) and uses "
                  f"{rec['fwd_bwd_temp_bytes'] / max(c['fwd_bwd_temp_bytes'], 1):.1f}x less temp "
                  "memory")
    print(json.dumps(dict(device=device.device_kind, platform=device.platform, scaled=scaled,
                          batch=b, heads=h, dim=d, times=list(times), dtype=dtype.name,
                          notes=notes, results=results)))
    return results


if __name__ == "__main__":
    main()
