"""Fact recall: a memory model against a dense model with no fewer FLOPs per token (CPU).

Synthetic data: F random facts `(k1, k2) -> v` over disjoint token ranges. A row is a run of
facts `k1 k2 v | k1 k2 v | ...` (`|` = separator token) drawn uniformly at random, so the only
way to predict a `v` is to have stored the fact. Both models are `tiny`-shaped transformers
trained with the same optimizer, batches and steps; the memory model replaces the FFN of one
block with a product-key memory (`--variant`, default pkm). Reported: the loss on value tokens
over training, and recall accuracy (argmax at the value position) over all F facts at the end.

    python benchmarks/memory_vs_dense.py                 # ~10 minutes on 2 CPU cores
    python benchmarks/memory_vs_dense.py --facts 8192 --steps 600 --variant memory_plus
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnemax.layers.memory import MemoryConfig
from mnemax.parallel.rules import logical_axis_rules
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.setup import build_program

SEPARATOR = 0
KEY_BASE = 1


def make_facts(num_facts: int, key_vocab: int, value_vocab: int, seed: int) -> np.ndarray:
    """`[F, 3]` int32 rows (k1, k2, v): distinct keys, random values."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(key_vocab * key_vocab, size=num_facts, replace=False)
    k1, k2 = flat // key_vocab + KEY_BASE, flat % key_vocab + KEY_BASE
    values = rng.integers(0, value_vocab, num_facts) + KEY_BASE + key_vocab
    return np.stack([k1, k2, values], 1).astype(np.int32)


def fact_rows(facts: np.ndarray, order: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens: facts[order] as `k1 k2 v |` groups (4 tokens each)."""
    per_row = (seq_len + 1) // 4
    groups = facts[order].reshape(-1, per_row, 3)
    sep = np.full((*groups.shape[:2], 1), SEPARATOR, np.int32)
    rows = np.concatenate([groups, sep], axis=2).reshape(groups.shape[0], -1)
    pad = seq_len + 1 - rows.shape[1]
    return np.pad(rows, ((0, 0), (0, pad)), constant_values=SEPARATOR)


def value_mask(seq_len: int) -> np.ndarray:
    """Target positions `[seq_len]` whose target is a value token (every 4th, from index 1)."""
    mask = np.zeros(seq_len, bool)
    per_row = (seq_len + 1) // 4
    mask[np.arange(per_row) * 4 + 1] = True
    return mask


def run(recipe, facts, args, label):
    program = build_program(recipe)
    state = program.init(jax.random.key(0))
    rules = logical_axis_rules(recipe.strategy)
    seq_len, batch = recipe.data.seq_len, recipe.data.global_batch
    per_row = (seq_len + 1) // 4
    mask = jnp.asarray(value_mask(seq_len))

    @jax.jit
    def value_stats(params, rows):
        with nn.logical_axis_rules(rules):
            logits, _ = program.model.apply({"params": params}, rows[:, :-1])
        targets = rows[:, 1:]
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        correct = jnp.argmax(logits, -1) == targets
        return (jnp.sum(nll * mask) / (jnp.sum(mask) * rows.shape[0]),
                jnp.sum(correct * mask), jnp.sum(mask) * rows.shape[0])

    rng = np.random.default_rng(1)
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        order = rng.integers(0, len(facts), batch * per_row)
        rows = program.global_batch(fact_rows(facts, order, seq_len))
        state, _ = program.train_step(state, rows)
        if step % args.log_every == 0 or step == args.steps:
            with jax.set_mesh(program.mesh):
                loss, _, _ = value_stats(state.params, rows)
            curve.append((step, float(loss)))
            print(f"  {label:>6} step {step:4d}  value loss {float(loss):.3f}", flush=True)
    elapsed = time.perf_counter() - start
    correct = total = 0
    usable = len(facts) // (batch * per_row) * (batch * per_row)
    for chunk in np.arange(usable).reshape(-1, batch * per_row):
        with jax.set_mesh(program.mesh):
            _, c, t = value_stats(state.params, program.global_batch(
                fact_rows(facts, chunk, seq_len)))
        correct, total = correct + int(c), total + int(t)
    return {"curve": curve, "recall": correct / total, "seconds": elapsed,
            "params": program.param_count,
            "flops_per_token": recipe.model.flops_per_token(seq_len)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--variant", default="pkm", choices=["pkm", "memory_plus", "peer"])
    parser.add_argument("--rows", type=int, default=128**2, help="memory slots")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (both)")
    # Value rows are updated only when read, so they need a larger step than dense weights
    # (Lample et al. 2019 train them separately); with --sparse-lr equal to --lr the memory
    # model stays near chance in 400 steps.
    parser.add_argument("--sparse-lr", type=float, default=3e-2,
                        help="peak learning rate of the memory's value table")
    args = parser.parse_args(argv)

    key_vocab, value_vocab = 64, 64
    vocab = 1 + key_vocab + value_vocab
    facts = make_facts(args.facts, key_vocab, value_vocab, seed=0)
    common = ["model.vocab_size=192", "model.num_layers=2", "model.d_model=128",
              "model.num_heads=4", "model.mlp_dim=512", "data.seq_len=63",
              "data.global_batch=32", "run.compute_dtype=float32", "schedule.warmup_steps=20",
              f"run.steps={args.steps}", f"optimizer.learning_rate={args.lr}",
              "optimizer.weight_decay=0.0"]
    assert vocab <= 192
    dense = load_recipe("tiny", common)
    memory_cfg = MemoryConfig(variant=args.variant, num_rows=args.rows, num_heads=4, topk=16,
                              key_dim=64, query_norm="layernorm", layers=(1,),
                              qk_norm=args.variant == "memory_plus",
                              gated=args.variant == "memory_plus")
    memory = dataclasses.replace(
        dense, model=dataclasses.replace(dense.model, memory=memory_cfg),
        optimizer=dataclasses.replace(dense.optimizer, sparse_learning_rate=args.sparse_lr))

    print(f"{args.facts} facts, {args.steps} steps of {dense.data.global_batch} x "
          f"{dense.data.seq_len} tokens, on {jax.devices()[0].device_kind}")
    results = {"dense": run(dense, facts, args, "dense"),
               args.variant: run(memory, facts, args, args.variant)}
    print(f"\n{'model':>12} {'params':>10} {'MFLOPs/tok':>10} {'value loss':>10} {'recall':>7}"
          f" {'time':>7}")
    for name, r in results.items():
        print(f"{name:>12} {r['params']:>10,} {r['flops_per_token'] / 1e6:>10.2f} "
              f"{r['curve'][-1][1]:>10.3f} {100 * r['recall']:>6.1f}% {r['seconds']:>6.0f}s")
    dense_final = results["dense"]["curve"][-1][1]
    reached = next((s for s, loss in results[args.variant]["curve"] if loss <= dense_final), None)
    print(f"memory model reaches the dense model's final value loss ({dense_final:.3f}) at "
          f"step {reached} of {args.steps}" if reached else
          "memory model does not reach the dense model's final value loss")
    print(json.dumps({"facts": args.facts, "steps": args.steps, "results": results,
                      "memory_reaches_dense_final_loss_at": reached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
