"""Fact recall: every memory variant against dense models of equal FLOPs and of equal parameters.

Synthetic data: F random facts `(k1, k2) -> v` over disjoint token ranges. A row is a run of
facts `k1 k2 v | k1 k2 v | ...` (`|` = separator token) drawn uniformly at random, so the only
way to predict a `v` is to have stored the fact. Every model is a `tiny`-shaped transformer
scaled down (2 blocks of width 128) and trained with the same optimizer, batches and steps:

- `dense`: the FLOPs baseline; every memory model must have no more FLOPs per token (checked).
- `dense_params`: dense with a wider FFN, as many parameters as the `pkm` model.
- `pkm`, `memory_plus`, `ultramem`, `ultramemv2`, `peer`: the memory configs of the `*_tiny`
  recipes, scaled to this model (`scale_memory`).
- `moe`: `moe_tiny`'s mixture of experts (8 SwiGLU experts, top-2, every block) with the expert
  width that keeps its FLOPs at or under dense's (`moe_recipe`): the sparse baseline UltraMemV2
  compares memory layers with.

Reported per model: value loss over all F facts at the end, recall accuracy (argmax at the value
position) over all F facts, the first logged step at which the value loss on a fixed sample of
facts is at or below dense's final loss on it, parameters, FLOPs per token, and for memory models
the layer's `memory/usage` and `memory/weight_entropy` over all facts at the end.

    # the CPU run in benchmarks/RESULTS.md (~20 minutes on 2 shared cores); JSON + markdown:
    python benchmarks/memory_vs_dense.py --variants all --facts 1024 --steps 400 --batch 16 \
        --rows 4096 --out /tmp/mvd
    python benchmarks/memory_vs_dense.py --variants pkm,peer --facts 8192 --steps 600
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnemax.errors import ConfigError
from mnemax.layers.memory import MemoryConfig
from mnemax.layers.transformer import TransformerConfig
from mnemax.parallel.rules import logical_axis_rules
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.recipe import Recipe
from mnemax.trainer.setup import build_program

SEPARATOR = 0
KEY_BASE = 1
# Memory model -> the recipe whose memory config it uses.
MEMORY_RECIPES = {"pkm": "pkm_tiny", "memory_plus": "memory_plus_tiny",
                  "ultramem": "ultramem_tiny", "ultramemv2": "ultramemv2_tiny",
                  "peer": "peer_tiny"}
MODELS = ("dense", "dense_params", *MEMORY_RECIPES, "moe")
EVAL_BATCHES = 2  # batches of facts in the fixed sample the loss curve is measured on


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


def scale_memory(memory: MemoryConfig, source: TransformerConfig,
                 target: TransformerConfig, num_rows: int) -> MemoryConfig:
    """A recipe's memory config (built for `source`) on the smaller `target` model.

    Block i of source's L blocks becomes block floor(i L' / L) of target's L' (duplicates
    merged), so a memory in every block stays in every block; widths (`key_dim`, `value_dim`,
    `pre_value_dim`) scale by d' / d (key_dim kept even); `init_linear_std`, which the recipes
    set to the model's init std, becomes target's. Heads and top-k are kept and the slot count
    is `num_rows`."""
    ratio = target.d_model / source.d_model

    def width(dim: int | None) -> int | None:
        return None if dim is None else max(1, round(dim * ratio))

    layers = sorted({i * target.num_layers // source.num_layers for i in memory.layers})
    return dataclasses.replace(
        memory, num_rows=num_rows, layers=tuple(layers),
        key_dim=2 * max(1, round(memory.key_dim * ratio / 2)), value_dim=width(memory.value_dim),
        pre_value_dim=width(memory.pre_value_dim),
        init_linear_std=None if memory.init_linear_std is None else target.init_std)


def memory_recipe(dense: Recipe, name: str, num_rows: int, sparse_lr: float) -> Recipe:
    """`dense` with the memory of recipe `MEMORY_RECIPES[name]`, scaled to it."""
    source = load_recipe(MEMORY_RECIPES[name])
    memory = scale_memory(source.model.memory, source.model, dense.model, num_rows)
    return dataclasses.replace(
        dense, name=name, model=dataclasses.replace(dense.model, memory=memory),
        optimizer=dataclasses.replace(dense.optimizer, sparse_learning_rate=sparse_lr))


def moe_recipe(dense: Recipe) -> Recipe:
    """`dense` with `moe_tiny`'s experts in every block, each `F` wide with F the largest width
    whose k experts and router cost no more than dense's FFN: 3 D F k + D E <= 3 D mlp_dim."""
    moe = load_recipe("moe_tiny").model.moe
    model = dense.model
    width = (3 * model.hidden_dim - moe.num_experts) // (3 * moe.topk)
    moe = dataclasses.replace(moe, expert_dim=width, layers=tuple(range(model.num_layers)))
    return dataclasses.replace(dense, name="moe", model=dataclasses.replace(model, moe=moe))


def params_matched_dense(dense: Recipe, target_params: int) -> Recipe:
    """`dense` with the FFN width whose parameter count is closest to `target_params` (the count
    is affine in mlp_dim)."""
    def count(width: int) -> int:
        return dataclasses.replace(dense.model, mlp_dim=width).param_count()

    base = dense.model.hidden_dim
    per_unit = count(base + 1) - count(base)
    width = base + round((target_params - count(base)) / per_unit)
    return dataclasses.replace(dense, name="dense_params",
                               model=dataclasses.replace(dense.model, mlp_dim=width))


def train_and_evaluate(recipe: Recipe, facts: np.ndarray, steps: int, log_every: int,
                       label: str) -> dict:
    """Trains `recipe` on random fact rows; returns its value-loss curve on a fixed sample of
    facts, and its value loss, recall and memory aux over all facts at the end."""
    program = build_program(recipe)
    state = program.init(jax.random.key(0))
    rules = logical_axis_rules(recipe.strategy)
    seq_len, batch = recipe.data.seq_len, recipe.data.global_batch
    per_batch = batch * ((seq_len + 1) // 4)
    mask = jnp.asarray(value_mask(seq_len))

    @jax.jit
    def value_stats(params, rows):
        with nn.logical_axis_rules(rules):
            logits, aux = program.model.apply({"params": params}, rows[:, :-1])
        targets = rows[:, 1:]
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        correct = jnp.argmax(logits, -1) == targets
        stats = {"nll": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask),
                 "count": jnp.sum(mask) * rows.shape[0]}
        return stats | {k: v for k, v in aux.items() if k.startswith("memory/")}

    def evaluate(params, fact_ids: np.ndarray) -> dict[str, float]:
        totals: dict[str, float] = {}
        chunks = fact_ids.reshape(-1, per_batch)
        for chunk in chunks:
            with jax.set_mesh(program.mesh):
                out = value_stats(params, program.global_batch(fact_rows(facts, chunk, seq_len)))
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        out = {"value_loss": totals["nll"] / totals["count"],
               "recall": totals["correct"] / totals["count"]}
        # Aux metrics are per-batch means (averaged over the memory layers): average the batches.
        return out | {k: v / len(chunks) for k, v in totals.items() if k.startswith("memory/")}

    sample = np.random.default_rng(2).permutation(len(facts))[:EVAL_BATCHES * per_batch]
    rng = np.random.default_rng(1)  # the same batches for every model
    curve = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        order = rng.integers(0, len(facts), per_batch)
        state, _ = program.train_step(state, program.global_batch(fact_rows(facts, order,
                                                                            seq_len)))
        if step == 1:
            jax.block_until_ready(state)
            compiled = time.perf_counter()  # the first step's time is mostly compilation
        if step % log_every == 0 or step == steps:
            loss = evaluate(state.params, sample)["value_loss"]
            curve.append((step, loss))
            print(f"  {label:>12} step {step:4d}  value loss {loss:.3f}", flush=True)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    # Steady-state time of a training step (evaluations excluded by difference is not possible
    # without more syncs; they are forward-only and a few per log interval).
    per_step = (time.perf_counter() - compiled) / max(steps - 1, 1)
    final = evaluate(state.params, np.arange(len(facts) // per_batch * per_batch))
    return final | {"curve": curve, "seconds": seconds, "step_seconds": per_step,
                    "params": program.param_count,
                    "flops_per_token": recipe.model.flops_per_token(seq_len),
                    "memory_layers": list(recipe.model.memory.layers)
                    if recipe.model.memory else list(recipe.model.moe.layers)
                    if recipe.model.moe else []}


def first_step_at_or_below(curve: list[tuple[int, float]], loss: float) -> int | None:
    return next((step for step, value in curve if value <= loss), None)


def markdown_table(results: dict[str, dict]) -> str:
    """One row per model: the figures this benchmark reports."""
    head = ("| model | memory / MoE blocks | params | MFLOPs/token | final value loss | recall | "
            "steps to dense's final loss | memory/usage | memory/weight_entropy | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        reached = r["steps_to_dense_loss"]
        usage, entropy = r.get("memory/usage"), r.get("memory/weight_entropy")
        lines.append(
            f"| {name} | {','.join(map(str, r['memory_layers'])) or '-'} | {r['params']:,} | "
            f"{r['flops_per_token'] / 1e6:.2f} | {r['value_loss']:.3f} | "
            f"{100 * r['recall']:.1f}% | {'never' if reached is None else reached} | "
            f"{'-' if usage is None else f'{100 * usage:.1f}%'} | "
            f"{'-' if entropy is None else f'{entropy:.3f}'} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def parse_models(spec: str) -> list[str]:
    """`all` or a comma list of MODELS; dense (the baseline) always runs first."""
    names = list(MODELS[1:]) if spec == "all" else [s.strip() for s in spec.split(",") if s]
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise ConfigError(f"--variants names unknown models {bad}; choose from "
                          f"{', '.join(MODELS[1:])} or all")
    return ["dense", *(n for n in MODELS[1:] if n in names)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all",
                        help=f"all, or a comma list of {', '.join(MODELS[1:])} (dense always runs)")
    parser.add_argument("--facts", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32, help="rows of 63 tokens per step")
    parser.add_argument("--rows", type=int, default=128**2, help="memory slots")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (all)")
    # Value rows are updated only when read, so they need a larger step than dense weights
    # (Lample et al. 2019 train them separately); with --sparse-lr equal to --lr the pkm model
    # stays near chance in 400 steps. 10x --lr, as the *_tiny recipes.
    parser.add_argument("--sparse-lr", type=float, default=3e-2,
                        help="peak learning rate of the memory tables (optimizer."
                             "sparse_learning_rate)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for memory_vs_dense.json and memory_vs_dense.md")
    args = parser.parse_args(argv)
    names = parse_models(args.variants)

    key_vocab, value_vocab = 64, 64
    facts = make_facts(args.facts, key_vocab, value_vocab, seed=0)
    common = ["model.vocab_size=192", "model.num_layers=2", "model.d_model=128",
              "model.num_heads=4", "model.mlp_dim=512", "data.seq_len=63",
              f"data.global_batch={args.batch}", "run.compute_dtype=float32",
              "schedule.warmup_steps=20", f"run.steps={args.steps}",
              f"optimizer.learning_rate={args.lr}", "optimizer.weight_decay=0.0"]
    assert 1 + key_vocab + value_vocab <= 192
    dense = load_recipe("tiny", common)
    per_batch = dense.data.global_batch * ((dense.data.seq_len + 1) // 4)
    if args.facts < EVAL_BATCHES * per_batch or args.facts % per_batch:
        raise ConfigError(f"--facts={args.facts} must be a multiple of {per_batch} (facts per "
                          f"batch), at least {EVAL_BATCHES * per_batch}")
    recipes = {"dense": dense}
    for name in MEMORY_RECIPES:
        recipes[name] = memory_recipe(dense, name, args.rows, args.sparse_lr)
    recipes["dense_params"] = params_matched_dense(dense, recipes["pkm"].model.param_count())
    recipes["moe"] = moe_recipe(dense)
    dense_flops = dense.model.flops_per_token(dense.data.seq_len)
    for name in (*MEMORY_RECIPES, "moe"):
        flops = recipes[name].model.flops_per_token(dense.data.seq_len)
        if flops > dense_flops:
            raise ConfigError(f"{name} costs {flops / 1e6:.2f} MFLOPs/token, more than dense's "
                              f"{dense_flops / 1e6:.2f}: the comparison needs dense >= memory")

    print(f"{args.facts} facts, {args.steps} steps of {dense.data.global_batch} x "
          f"{dense.data.seq_len} tokens, on {jax.devices()[0].device_kind}; dense_params has "
          f"mlp_dim={recipes['dense_params'].model.mlp_dim}", flush=True)
    start = time.perf_counter()
    results = {}
    for name in names:
        results[name] = train_and_evaluate(recipes[name], facts, args.steps, args.log_every,
                                           name)
    wall = time.perf_counter() - start
    dense_final = results["dense"]["curve"][-1][1]
    for r in results.values():
        r["steps_to_dense_loss"] = first_step_at_or_below(r["curve"], dense_final)
    table = markdown_table(results)
    summary = {"facts": args.facts, "steps": args.steps, "batch": args.batch, "rows": args.rows,
               "lr": args.lr,
               "sparse_lr": args.sparse_lr, "wall_seconds": wall,
               "device": jax.devices()[0].device_kind,
               "memory_configs": {n: dataclasses.asdict(recipes[n].model.memory)
                                  for n in names if recipes[n].model.memory},
               "dense_params_mlp_dim": recipes["dense_params"].model.mlp_dim,
               "results": results}
    print(f"\n{table}\n\nwall {wall:.0f} s; steps to dense's final loss: first logged step whose "
          f"value loss on the fixed sample is <= dense's final {dense_final:.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory_vs_dense.json").write_text(json.dumps(summary, indent=1))
        (args.out / "memory_vs_dense.md").write_text(table + "\n")
        print(f"wrote {args.out / 'memory_vs_dense.json'} and {args.out / 'memory_vs_dense.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
