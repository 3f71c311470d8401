"""What several test modules share: the small recipes and reading a run directory back.

Test modules import from here (and from `tests.helpers.equivalence`), never from each other.
"""

from __future__ import annotations

import json
from pathlib import Path

from mnemax.recipes.registry import load_recipe
from mnemax.trainer.recipe import Recipe

# A model small enough that a step takes milliseconds on CPU; fp32 so that sharded and
# unsharded runs agree to 1e-5.
SMALL = (
    "model.num_layers=2", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=128", "data.seq_len=32", "data.global_batch=16", "run.compute_dtype=float32",
    "schedule.warmup_steps=2", "eval.every=0", "checkpoint.every=0", "run.log_every=1",
)
# Memory layers shrunk to 256 slots, 2 heads of top-4 (with SMALL).
SMALL_MEMORY = ("model.memory.num_rows=256", "model.memory.topk=4", "model.memory.key_dim=16",
                "model.memory.num_heads=2")
# ultramemv2_tiny's 64-wide pre-values and values would equal SMALL's d_model (no projection).
SMALL_ULTRAMEMV2 = ("model.memory.pre_value_dim=16", "model.memory.value_dim=16")


def small_memory_recipe(name: str, *overrides: str) -> Recipe:
    """A memory recipe shrunk with SMALL and SMALL_MEMORY (memories in blocks 0 and 1 for the
    variants that have one in every block, else in block 1)."""
    every_block = name in ("ultramem_tiny", "memory_plus_tiny", "ultramemv2_tiny")
    layers = "model.memory.layers=0,1" if every_block else "model.memory.layers=1"
    extra = SMALL_ULTRAMEMV2 if name == "ultramemv2_tiny" else ()
    return load_recipe(name, [*SMALL, *SMALL_MEMORY, layers, *extra, *overrides])


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """`metrics.jsonl` of a run directory by step (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        records[record["step"]] = record
    return records
