"""Benchmark of the attention layers: forward+backward of dense causal attention, MoBA and NSA at
long sequences, the same number of tokens per step at every length.

    python benchmarks/attention.py [--seq-lens 8192,32768,131072 --tokens 131072]
        [--heads 16 --kv-heads 4 --head-dim 128] [--variants dense,moba,nsa]
        [--dense-impl auto] [--sparse-impl auto] [--iters 3] [--cpu-scale] [--out FILE]
        [--nsa-query-blocks 16,64] [--keys-only]

Each variant is the layer (projections, RoPE, attention, output projection) on `[B, T, H d]`
input with B = tokens / T: `GroupedQueryAttention` (`--dense-impl`, auto: the XLA path on
CPU/GPU, splash on TPU), `MoBAAttention` as `moba_1b_32k` (Lu et al. 2025: blocks of 512, own
block + top-2 earlier blocks, lists capped at 8 blocks) and `NSAAttention` with the NSA paper's
settings (Yuan et al. 2025, Sec. 4.1: l=32, d=16, l'=64, n=16, w=512). Timed: `jax.grad` of
sum(out^2) w.r.t. the parameters and the input, jitted. Reported per (T, variant): the median
time, its ratio to dense at the same T, and the FLOPs the layer's block component claims
(`flops_per_token` x tokens, which counts the keys of every listed block, `keys_read`) per
second. On a GPU compare with `--dense-impl cudnn` (the issue's target is against cuDNN; the
XLA path holds the T x T scores, which at T = 131072 do not fit). `--cpu-scale` shrinks the
shape so the run takes minutes on a CPU (said in the output).

`--nsa-query-blocks 16,64` also prints, per T and NSA query group size (`NSAConfig.query_block`),
the keys each query reads, measured from the block lists the layer builds (forward of one
sequence, random input and parameters): whole listed blocks of the selection branch (valid
slots x l', averaged over the tokens of each group), that plus the window branch's listed blocks
and the compressed tokens (total), against dense causal attention's (T + 1) / 2, and the
fraction of choices a capped list dropped. `--keys-only` skips the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types

import jax
import jax.numpy as jnp
from timing import median_time

from mnemax.layers.attention import GroupedQueryAttention
from mnemax.layers.components.attention import AttentionMixer
from mnemax.layers.components.base import BlockContext
from mnemax.layers.components.sparse_attention import MoBAMixer, NSAMixer
from mnemax.layers.sparse_attention import MoBAConfig, NSAConfig
from mnemax.layers.sparse_attention.moba import MoBAAttention
from mnemax.layers.sparse_attention.nsa import DROPPED, NSAAttention, window_lists

VARIANTS = ("dense", "moba", "nsa")
FULL = {"seq_lens": "8192,32768,131072", "tokens": 131072, "heads": 16, "kv_heads": 4,
        "head_dim": 128, "moba_block": 512, "moba_max_blocks": 8,
        "nsa": "32,16,64,16,512"}
CPU = {"seq_lens": "1024,2048,4096", "tokens": 8192, "heads": 4, "kv_heads": 1,
       "head_dim": 64, "moba_block": 64, "moba_max_blocks": 8, "nsa": "16,8,32,4,64"}


def _nsa_config(spec: str, max_blocks: int | None, query_block: int | None = None) -> NSAConfig:
    """`l,d,l',n,w` -> NSAConfig (compress block, stride, select block, blocks, window; query
    groups of `query_block` tokens, None: the config's default)."""
    block, stride, select, n, w = (int(v) for v in spec.split(","))
    config = NSAConfig(compress_block=block, compress_stride=stride, select_block=select,
                       select_blocks=n, window=w, max_blocks=max_blocks)
    return config if query_block is None else dataclasses.replace(config,
                                                                  query_block=query_block)


def _layers(args: argparse.Namespace) -> dict[str, tuple[object, object]]:
    """variant -> (flax module, block component whose `flops_per_token` the layer claims)."""
    shape = dict(num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    comp = dict(shape, rope_theta=10_000.0, init_std=0.02)
    moba = MoBAConfig(block_size=args.moba_block, topk=args.moba_topk,
                      max_blocks=args.moba_max_blocks or None)
    nsa = _nsa_config(args.nsa, args.nsa_max_blocks or None, args.nsa_query_block)
    moba.validate()
    nsa.validate(args.head_dim)
    return {
        "dense": (GroupedQueryAttention(**shape, impl=args.dense_impl),
                  AttentionMixer(**comp, impl=args.dense_impl)),
        "moba": (MoBAAttention(**shape, config=moba, sparse_impl=args.sparse_impl),
                 MoBAMixer(**comp, config=moba, impl=args.sparse_impl)),
        "nsa": (NSAAttention(**shape, config=nsa, sparse_impl=args.sparse_impl),
                NSAMixer(**comp, config=nsa, impl=args.sparse_impl)),
    }


def nsa_keys_read(args: argparse.Namespace, seq_len: int, query_block: int) -> dict:
    """Keys per query NSA reads at `seq_len` with query groups of `query_block` tokens,
    measured from the selection lists its forward builds (see the module docstring)."""
    cfg = _nsa_config(args.nsa, args.nsa_max_blocks or None, query_block)
    cfg.validate(args.head_dim)
    module = NSAAttention(num_heads=args.heads, num_kv_heads=args.kv_heads,
                          head_dim=args.head_dim, config=cfg, sparse_impl="reference")
    d_model = args.heads * args.head_dim
    x = jax.random.normal(jax.random.key(0), (1, seq_len, d_model), jnp.dtype(args.dtype))
    positions = jnp.arange(seq_len, dtype=jnp.int32)
    small = min(seq_len, 4 * cfg.select_block)  # parameter shapes do not depend on T
    params = jax.jit(module.init)(jax.random.key(1), x[:, :small], positions[:small])
    forward = jax.jit(lambda p, x, pos: module.apply(p, x, pos, mutable=["intermediates"]))
    (_, aux), state = forward(params, x, positions)
    lists = state["intermediates"]["selection"][0]  # [1, heads, nq, L]
    tokens = jnp.minimum(query_block, seq_len - query_block * jnp.arange(lists.shape[2]))
    listed = jnp.sum(lists >= 0, axis=-1)  # [1, heads, nq]
    slc = float(jnp.sum(listed * tokens) / (seq_len * args.heads)) * cfg.select_block
    win_lists = window_lists(1, 1, seq_len, cfg)[0, 0]  # [n, W], one list per key block
    win_tokens = jnp.minimum(cfg.select_block,
                             seq_len - cfg.select_block * jnp.arange(win_lists.shape[0]))
    win = float(jnp.sum(jnp.sum(win_lists >= 0, axis=-1) * win_tokens) / seq_len)
    win *= cfg.select_block
    total = cfg.mean_compressed_read(seq_len) + slc + win
    return {"seq_len": seq_len, "query_block": query_block, "slots": lists.shape[-1],
            "slc_keys": slc, "total_keys": total, "dense_keys": (seq_len + 1) / 2,
            "dropped": float(aux[DROPPED])}


def _fwd_bwd(module):
    def loss(params, x, positions):
        out, _ = module.apply(params, x, positions)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, (0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default=None, help=f"default {FULL['seq_lens']}")
    parser.add_argument("--tokens", type=int, default=None, help="B x T, default 131072")
    parser.add_argument("--heads", type=int, default=None, help="default 16")
    parser.add_argument("--kv-heads", type=int, default=None, help="default 4")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128")
    parser.add_argument("--moba-block", type=int, default=None, help="default 512")
    parser.add_argument("--moba-topk", type=int, default=2)
    parser.add_argument("--moba-max-blocks", type=int, default=None,
                        help="default 8 (moba_1b_32k); 0: exact lists")
    parser.add_argument("--nsa", default=None, help="l,d,l',n,w (default 32,16,64,16,512)")
    parser.add_argument("--nsa-max-blocks", type=int, default=0, help="0: exact lists")
    parser.add_argument("--nsa-query-block", type=int, default=None,
                        help=f"tokens per selection list (default {NSAConfig.query_block})")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dense-impl", default="auto", choices=("auto", "xla", "cudnn", "splash"))
    parser.add_argument("--sparse-impl", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cpu-scale", action="store_true",
                        help="the defaults of a CPU run: H=4, kv 1, d=64, MoBA blocks 64, NSA "
                             "16,8,32,4,64, T in 1024,2048,4096, B*T=8192")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--nsa-query-blocks", default=None,
                        help="e.g. 16,64: print NSA's keys read per query at these query groups")
    parser.add_argument("--keys-only", action="store_true", help="skip the timing")
    args = parser.parse_args()
    defaults = CPU if args.cpu_scale else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    platform = jax.default_backend()
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants {sorted(unknown)}: choose from {VARIANTS}")
    layers = _layers(args)
    d_model = args.heads * args.head_dim
    ctx = BlockContext(model=types.SimpleNamespace(d_model=d_model), layer=0, ffn_hidden_dim=0,
                       out_init_std=0.02)
    dtype = jnp.dtype(args.dtype)
    print(f"{platform}{' (--cpu-scale)' if args.cpu_scale else ''}: H={args.heads} "
          f"kv={args.kv_heads} d={args.head_dim} D={d_model} {args.dtype}, B*T={args.tokens}; "
          f"MoBA block {args.moba_block} top-{args.moba_topk} max_blocks "
          f"{args.moba_max_blocks or None}; NSA l,d,l',n,w={args.nsa} max_blocks "
          f"{args.nsa_max_blocks or None} query_block {layers['nsa'][0].config.query_block}; "
          f"dense impl {args.dense_impl}, sparse impl "
          f"{args.sparse_impl}; median of {args.iters}")
    print(f"{'T':>7} {'B':>3} {'variant':>7} {'ms':>10} {'/dense':>7} {'speedup':>7} {'GFLOP':>9} "
          f"{'TFLOP/s':>8}")
    rows = []
    for seq_len in [] if args.keys_only else seq_lens:
        if args.tokens % seq_len:
            parser.error(f"--tokens {args.tokens} is not a multiple of T={seq_len}")
        batch = args.tokens // seq_len
        x = jax.random.normal(jax.random.key(0), (batch, seq_len, d_model), dtype)
        positions = jnp.arange(seq_len, dtype=jnp.int32)
        dense_s = None
        for name in variants:
            module, component = layers[name]
            params = jax.jit(module.init)(jax.random.key(1), x, positions)
            seconds = median_time(_fwd_bwd(module), (params, x, positions), args.iters)
            dense_s = seconds if name == "dense" else dense_s
            flops = component.flops_per_token(ctx, seq_len) * args.tokens
            row = {"platform": platform, "seq_len": seq_len, "batch": batch, "variant": name,
                   "ms": 1e3 * seconds,
                   "over_dense": seconds / dense_s if dense_s else None,
                   "speedup": dense_s / seconds if dense_s else None,
                   "claimed_gflop": flops / 1e9, "claimed_tflops": flops / seconds / 1e12}
            rows.append(row)
            ratio = f"{row['over_dense']:>7.3f} {row['speedup']:>7.2f}" if dense_s else "-"
            print(f"{seq_len:>7} {batch:>3} {name:>7} {row['ms']:>10.1f} {ratio:>15} "
                  f"{row['claimed_gflop']:>9.1f} {row['claimed_tflops']:>8.4f}", flush=True)
            del params
    keys = []
    if args.nsa_query_blocks:
        print(f"NSA keys read per query (l'={args.nsa.split(',')[2]}, measured from the lists; "
              "total = compressed + selected + window):")
        print(f"{'T':>7} {'Q':>4} {'slots':>5} {'selected':>9} {'total':>9} {'dense':>9} "
              f"{'total/dense':>11} {'dropped':>8}")
        for seq_len in seq_lens:
            for query_block in (int(v) for v in args.nsa_query_blocks.split(",")):
                row = nsa_keys_read(args, seq_len, query_block)
                keys.append(row)
                print(f"{seq_len:>7} {query_block:>4} {row['slots']:>5} {row['slc_keys']:>9.0f} "
                      f"{row['total_keys']:>9.0f} {row['dense_keys']:>9.0f} "
                      f"{row['total_keys'] / row['dense_keys']:>11.3f} {row['dropped']:>8.4f}",
                      flush=True)
    config = {key: getattr(args, key) for key in
              ("tokens", "heads", "kv_heads", "head_dim", "moba_block", "moba_topk",
               "moba_max_blocks", "nsa", "nsa_max_blocks", "nsa_query_block", "dense_impl",
               "sparse_impl", "dtype", "iters", "cpu_scale")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config, "rows": rows, "nsa_keys_read": keys}, f, indent=1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
