"""Which parameters the optimizer decays, and at which learning rate, by their role."""

import re

import jax
import numpy as np
import pytest

from mnemax.layers.roles import role_of
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.setup import build_program

ONE_DEVICE = "strategy.mesh=data:1"

# Explicit lists: a parameter is decayed when it is a projection or an embedding, never a norm
# gain, a per-head vector (A_log, dt_bias), product sub-keys or a value table.
TINY_DECAYED = [
    "embedding", "layers/block/attn/k", "layers/block/attn/o", "layers/block/attn/q",
    "layers/block/attn/v", "layers/block/mlp/down", "layers/block/mlp/gate",
    "layers/block/mlp/up", "unembed",
]
GDN_DECAYED = [
    "embedding", "layers/block/gdn/beta", "layers/block/gdn/conv", "layers/block/gdn/decay",
    "layers/block/gdn/k", "layers/block/gdn/o", "layers/block/gdn/q", "layers/block/gdn/v",
    "layers/block/gdn/z", "layers/block/mlp/down", "layers/block/mlp/gate",
    "layers/block/mlp/up", "unembed",
]
_ATTENTION = ["attn/k", "attn/o", "attn/q", "attn/v"]
_MLP = ["mlp/down", "mlp/gate", "mlp/up"]
_MEMORY = ["memory/gate", "memory/out", "memory/retrieval/query"]
# Memory+ replaces the FFN of blocks 1 and 3; its shared value table is not decayed.
MEMORY_PLUS_DECAYED = sorted(
    ["embedding", "unembed"]
    + [f"layer_{i}/{p}" for i in range(4) for p in _ATTENTION]
    + [f"layer_{i}/{p}" for i in (0, 2) for p in _MLP]
    + [f"layer_{i}/{p}" for i in (1, 3) for p in _MEMORY])


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _leaves(tree) -> dict[str, object]:
    return {_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _decayed_by_update(recipe) -> tuple[list[str], dict]:
    """Parameters that one optimizer step with zero gradients changes: Adam's moments stay 0,
    so its update is exactly 0 and only decoupled weight decay (-lr * wd * p) moves a
    parameter. Returns them and the roles."""
    program = build_program(recipe, jax.devices()[:1])
    params = program.init(jax.random.key(0)).params
    tx = program.tx
    zeros = jax.tree.map(np.zeros_like, params)
    # Step 5 of the warmup: lr > 0, so every decayed parameter moves.
    opt_state = tx.init(params)
    update = jax.jit(tx.update)  # op by op, the optimizer's many small ops dominate the test
    for _ in range(5):
        updates, opt_state = update(zeros, opt_state, params)
    moved = [name for name, u in _leaves(updates).items() if np.any(np.asarray(u) != 0)]
    return sorted(moved), _leaves(program.roles)


@pytest.mark.parametrize(("name", "expected"), [
    ("tiny", TINY_DECAYED), ("gdn_tiny", GDN_DECAYED), ("memory_plus_tiny", MEMORY_PLUS_DECAYED),
])
def test_decayed_parameters_are_exactly_the_matrices(name, expected):
    recipe = load_recipe(name, [ONE_DEVICE, "data.seq_len=32", "data.global_batch=2"])
    moved, roles = _decayed_by_update(recipe)
    assert moved == sorted(expected)
    # Everything else is a norm gain, a per-head vector, keys or a table, never decayed.
    others = {roles[n] for n in roles if n not in expected}
    assert others <= {"scale", "vector", "keys", "table"}, others


def test_scanned_and_looped_models_decay_the_same_parameters():
    scanned, _ = _decayed_by_update(load_recipe("gdn_tiny", [ONE_DEVICE, "data.seq_len=32"]))
    looped, _ = _decayed_by_update(load_recipe(
        "gdn_tiny", [ONE_DEVICE, "data.seq_len=32", "model.scan_layers=false"]))
    as_scanned = sorted({re.sub(r"^layer_\d+/", "layers/block/", n) for n in looped})
    assert as_scanned == scanned and len(looped) == 4 * 11 + 2


def test_roles_by_logical_axes():
    assert role_of(("layers", "norm")) == "scale"
    assert role_of(("norm",)) == "scale"
    assert role_of(("layers", "heads")) == "vector"  # A_log / dt_bias stacked by nn.scan
    assert role_of(("heads",)) == "vector"
    assert role_of(("layers", "embed", "heads")) == "matrix"
    assert role_of(("conv", "heads")) == "matrix"
    assert role_of(("memory_heads", None, "memory_keys", "memory_key_dim")) == "keys"
    assert role_of(("memory_heads", "memory_rank", None)) == "core"
    assert role_of(("memory_rows", "memory_dim")) == "table"


def test_tables_get_the_sparse_learning_rate_and_no_decay():
    """PKM's value table: with zero gradients it does not move (no decay); with a constant
    gradient its first Adam step is -lr_sparse * sign(g), 10x the dense one here."""
    recipe = load_recipe("pkm_tiny", [ONE_DEVICE, "data.seq_len=32", "data.global_batch=2",
                                      "optimizer.learning_rate=1e-3",
                                      "optimizer.sparse_learning_rate=1e-2",
                                      "schedule.warmup_steps=0", "schedule.decay=constant"])
    program = build_program(recipe, jax.devices()[:1])
    params = program.init(jax.random.key(0)).params
    roles = _leaves(program.roles)
    assert roles["layer_2/memory/values"] == "table"
    ones = jax.tree.map(np.ones_like, params)
    updates, _ = program.tx.update(ones, program.tx.init(params), params)
    flat = _leaves(updates)
    # Adam's first step: m / sqrt(v) = 1 (bias-corrected), so the update is -lr (eps aside).
    np.testing.assert_allclose(flat["layer_2/memory/values"], -1e-2, rtol=1e-4)
    p = np.asarray(_leaves(params)["layer_0/mlp/up"])
    np.testing.assert_allclose(flat["layer_0/mlp/up"], -1e-3 * (1 + 0.1 * p), rtol=1e-4,
                               atol=1e-9)
