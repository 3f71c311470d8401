"""Benchmark of the MoE layer: forward+backward against a dense SwiGLU FFN of the same active
FLOPs (width k x expert width, plus the shared experts).

    python benchmarks/moe.py [--tokens 16384 --d-model 2048] [--configs 8x2,64x6+1]
        [--expert-dim 0] [--iters 5] [--cpu-scale]

A config `ExK[+S]` is E experts, top-K, S shared experts; the expert width defaults to the
dense FFN width (8/3 d, rounded to 256) divided by K + S, so every config does the dense FFN's
active FLOPs plus its router. Reported per config: the MoE layer's median time, the FLOP-matched
dense FFN's, their ratio (target on a GPU: MoE within 1.5x of dense), and the layer's achieved
TFLOP/s. On CPU the shape is scaled down (`--cpu-scale`, said in the output). Dropless
dispatch, softmax router, the grouped matmul the platform picks (`impl=auto`: megablox on TPU,
`jax.lax.ragged_dot` elsewhere).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from timing import median_time

from mnemax.layers.mlp import SwiGLU, swiglu_hidden_dim
from mnemax.layers.moe import MoEConfig, MoELayer


def _parse(spec: str) -> tuple[int, int, int]:
    experts, rest = spec.split("x")
    topk, _, shared = rest.partition("+")
    return int(experts), int(topk), int(shared or 0)


def _fwd_bwd(module, params, x):
    def loss(params, x):
        out = module.apply(params, x)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, (0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--configs", default="8x2,64x6+1")
    parser.add_argument("--expert-dim", type=int, default=0, help="0: dense width / (K + S)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cpu-scale", action="store_true",
                        help="tokens 2048, d_model 256 (the default on CPU)")
    args = parser.parse_args()
    platform = jax.default_backend()
    if args.cpu_scale or platform == "cpu":
        args.tokens, args.d_model, args.dtype = 2048, 256, "float32"
        print(f"CPU: scaled down to {args.tokens} tokens, d_model {args.d_model}, float32")
    dtype = jnp.dtype(args.dtype)
    d, dense_width = args.d_model, swiglu_hidden_dim(args.d_model)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, d), dtype)
    rows = []
    for spec in args.configs.split(","):
        experts, topk, shared = _parse(spec)
        width = args.expert_dim or dense_width // (topk + shared)
        moe = MoELayer(MoEConfig(num_experts=experts, topk=topk, expert_dim=width,
                                 num_shared_experts=shared, layers=(0,)))
        dense = SwiGLU((topk + shared) * width)
        timings = {}
        for name, module in (("moe", moe), ("dense", dense)):
            params = jax.jit(module.init)(jax.random.key(1), x)
            fn = _fwd_bwd(module, params, x)
            timings[name] = median_time(fn, (params, x), args.iters)
        flops = 6 * args.tokens * ((topk + shared) * 3 * d * width + d * experts)
        row = {"config": spec, "platform": platform, "tokens": args.tokens, "d_model": d,
               "expert_dim": width, "moe_ms": 1e3 * timings["moe"],
               "dense_ms": 1e3 * timings["dense"],
               "moe_over_dense": timings["moe"] / timings["dense"],
               "moe_tflops": flops / timings["moe"] / 1e12}
        rows.append(row)
        print(f"{spec:>8}: moe {row['moe_ms']:.2f} ms, FLOP-matched dense {row['dense_ms']:.2f} "
              f"ms, ratio {row['moe_over_dense']:.2f}, {row['moe_tflops']:.3f} TFLOP/s "
              f"(expert width {width})")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
