"""Every memory variant's forward against a brute-force NumPy reference written from the params
tree: all N slots scored, top-k, the variant's weighting, rows summed, heads combined, then the
gate / projections. Plus UltraMem's pieces: the shuffle, the rank-1 search, the core penalty.

Tolerance (all cases): the layer runs in fp32 (eps = 6e-8), the reference in fp64. A score is a
normalised dot product of <= 2 x 16 terms, through at most one r x r core: relative error
<= ~50 eps = 3e-6. Softmax weights inherit it (|dw| <= w * 2 * 3e-6), raw scores carry it; each
output entry is a sum of <= H * k * C = 16 weighted value entries, then of at most two <= 16-term
projections, each stage adding ~3e-6 relative error per term: ~1e-5 of the terms' scale, and
with random signs errors and terms both add in quadrature, so ~1e-5 x |out| <= 1e-4 for outputs
of size <= 8 (UltraMem's raw scores; the softmax variants stay below 1.5). We assert atol 2e-4
(measured: below 1.2e-6). A wrong slot, weighting, core order or projection moves an output by
O(its size), > 1e-2 in every case below.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.layers.memory import MemoryConfig, MemoryLayer, memory_param_count
from mnemax.layers.memory import retrieval as retrieval_module
from mnemax.layers.memory.layer import TUCKER_LOSS
from mnemax.layers.memory.values import shuffle_virtual_index

D = 16
# The smallest layers that keep every path: two heads (one for UltraMemV2, whose paper uses one)
# reading k = 4 of 64 slots; UltraMem with a rank-3 core, 2 cores and 4-fold value expansion (16
# physical rows) and its core penalty on.
CASES = {
    "pkm": MemoryConfig(variant="pkm", num_rows=64, num_heads=2, topk=4, key_dim=8, value_dim=8),
    "memory_plus": MemoryConfig(variant="memory_plus", num_rows=64, num_heads=2, topk=4,
                                key_dim=8, qk_norm=True, gated=True, query_norm="none"),
    "ultramem": MemoryConfig(variant="ultramem", num_rows=64, num_heads=2, topk=4, key_dim=8,
                             tucker_rank=3, tucker_cores=2, tucker_penalty=0.5,
                             value_expansion=4, value_dim=8),
    "peer": MemoryConfig(variant="peer", num_rows=64, num_heads=2, topk=4, key_dim=8),
    "ultramemv2": MemoryConfig(variant="peer", num_rows=64, num_heads=1, topk=4, key_dim=8,
                               tucker_rank=2, pre_value_dim=8, value_dim=8,
                               peer_activation="none", slot_weights="scores",
                               init="ultramemv2", layers=(0, 1), mode="parallel"),
}


def _ln(x, gain=None):
    x = x - x.mean(-1, keepdims=True)
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
    return x if gain is None else x * gain


def _l2(x):
    return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def _gelu(x):  # jax.nn.gelu's default tanh form
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def reference_slots(cfg: MemoryConfig, p: dict, x: np.ndarray):
    """All N slots scored: -> weights [T, H, C, k], indices [T, H, k] (tokens flattened)."""
    h, half, n, k = cfg.num_heads, cfg.key_dim // 2, cfg.subkeys, cfg.topk
    r = max(cfg.tucker_rank, 1)
    q = np.einsum("td,dhk->thk", x, p["query"])
    keys = np.broadcast_to(p["subkeys"], (h, 2, n, half))
    if cfg.tucker_rank:
        q = _ln(q.reshape(-1, h, 2, r, half), p["query_gain"])
        keys = _ln(keys, p["key_gain"])
    else:
        if cfg.query_norm == "layernorm":
            q = _ln(q)
        q = q.reshape(-1, h, 2, 1, half)
        if cfg.qk_norm:
            q, keys = _l2(q) * p["query_gain"], _l2(keys) * p["key_gain"]
    weights, indices = [], []
    for head in range(h):
        rows = np.einsum("trd,nd->trn", q[:, head, 0], keys[head, 0])  # [T, r, n]
        cols = np.einsum("trd,nd->trn", q[:, head, 1], keys[head, 1])
        if cfg.tucker_rank:
            cores = p["core"][head]  # [C, r, r]
            per_core = np.einsum("tan,cab,tbm->tcnm", rows, cores, cols)  # all n*n slots
            # The method's search: candidates in the top-k rows of u^T S_row and top-k
            # columns of v^T S_col, (u, v) the leading singular pair of the summed core.
            left, _, right_t = np.linalg.svd(cores.sum(0))
            u, v = left[:, 0], right_t[0]
            if u.sum() < 0:
                u, v = -u, -v
            top_rows = np.argsort(-np.einsum("trn,r->tn", rows, u), -1)[:, :k]
            top_cols = np.argsort(-np.einsum("trn,r->tn", cols, v), -1)[:, :k]
            allowed = np.zeros((len(x), n, n), bool)
            for t in range(len(x)):
                allowed[t][np.ix_(top_rows[t], top_cols[t])] = True
            per_core = per_core.reshape(len(x), cfg.tucker_cores, n * n)
            total = np.where(allowed.reshape(len(x), -1), per_core.sum(1), -np.inf)
        else:
            total = (rows[:, 0, :, None] + cols[:, 0, None, :]).reshape(len(x), n * n)
            per_core = total[:, None]
        best = np.argsort(-total, -1, kind="stable")[:, :k]
        chosen = np.take_along_axis(per_core, best[:, None, :], -1)  # [T, C, k]
        if cfg.weighting == "softmax":
            chosen = np.exp(chosen - chosen.max(-1, keepdims=True))
            chosen /= chosen.sum(-1, keepdims=True)
        weights.append(chosen)
        indices.append(best)
    return np.stack(weights, 1), np.stack(indices, 1)


def reference_forward(cfg: MemoryConfig, p: dict, x: np.ndarray) -> np.ndarray:
    """The layer's output `[T, D]` from tokens `[T, D]`, in fp64."""
    weights, indices = reference_slots(cfg, p, x)
    out = np.zeros((len(x), p["values"].shape[1]))
    if cfg.variant == "peer":
        xp = x @ p["pre_value_proj"] if cfg.pre_value_dim else x
        for t in range(len(x)):
            for h in range(cfg.num_heads):
                for j, slot in enumerate(indices[t, h]):
                    act = p["expert_down"][slot] @ xp[t]
                    act = _gelu(act) if cfg.peer_activation == "gelu" else act
                    out[t] += weights[t, h, 0, j] * act * p["values"][slot]
        return out @ p["out"] if "out" in p else out
    e_count, c_count = cfg.value_expansion, cfg.tucker_cores
    physical = cfg.num_rows // e_count
    d = p["values"].shape[1]
    slots = np.asarray(shuffle_virtual_index(jnp.asarray(indices), cfg.num_rows))
    if e_count == 1:
        slots = indices
    grouped = np.zeros((len(x), e_count, d))
    for t in range(len(x)):
        for h in range(cfg.num_heads):
            for j, slot in enumerate(slots[t, h]):
                row, e = slot % physical, slot // physical
                parts = p["values"][row].reshape(c_count, -1)
                grouped[t, e] += (weights[t, h, :, j, None] * parts).reshape(d)
    if e_count > 1:
        out = np.einsum("tep,epv->tv", grouped, p["value_projections"])
    else:
        out = grouped[:, 0]
    if cfg.gated or cfg.variant == "memory_plus":
        z = x @ p["gate"]
        out = z / (1 + np.exp(-z)) * out
    return out @ p["out"] if "out" in p else out


@functools.cache
def _built(name: str):
    """One init and one forward per variant, shared by the tests (both jitted: compiling them
    once costs less than running them op by op). -> (layer, params, x, out, aux)."""
    cfg = CASES[name]
    x = jax.random.normal(jax.random.key(0), (2, 6, D))
    layer = MemoryLayer(cfg, num_layers=2)
    params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x))
    out, aux = jax.jit(layer.apply)(params, x)
    return layer, params, x, out, aux


def _expected(name: str) -> np.ndarray:
    _, params, x, _, _ = _built(name)
    return reference_forward(CASES[name], _flat_params(params),
                             np.asarray(x, np.float64).reshape(-1, D))


def _flat_params(params) -> dict:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    return {**{k: v for k, v in p.items() if k != "retrieval"}, **p["retrieval"]}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_equals_brute_force(name):
    cfg = CASES[name]
    cfg.validate(D, 2)
    _, params, _, out, _ = _built(name)
    assert sum(a.size for a in jax.tree.leaves(params)) == memory_param_count(cfg, D)
    expected = _expected(name)
    got = np.asarray(out).reshape(-1, D)
    assert np.abs(expected).max() > 1e-2  # the memory contributes
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4)


def test_tucker_search_fails_with_u_and_v_swapped(monkeypatch):
    """The cores are U(0, 1) draws (not symmetric): a search that used v for the rows and u for
    the columns picks other candidates, and the comparison above would fail."""
    layer, params, x, _, _ = _built("ultramem")
    core = np.asarray(params["params"]["retrieval"]["core"])
    assert np.abs(core - np.swapaxes(core, -1, -2)).max() > 0.1
    real = retrieval_module.rank_one_factors
    monkeypatch.setattr(retrieval_module, "rank_one_factors", lambda c: real(c)[::-1])
    # A new function, so jit traces it again with the swapped factors.
    swapped = jax.jit(lambda p, x: layer.apply(p, x)[0])(params, x)
    assert np.abs(np.asarray(swapped).reshape(-1, D) - _expected("ultramem")).max() > 1e-2


def test_shuffle_is_a_permutation_that_scatters_shared_rows():
    n_rows, expansion = 1024, 4
    perm = np.asarray(shuffle_virtual_index(jnp.arange(n_rows), n_rows))
    assert sorted(perm.tolist()) == list(range(n_rows))
    # Virtual slots sharing a physical row: s = perm(v) equal mod N/E. Their positions in the
    # 32 x 32 score grid are spread out (an unshuffled layout puts the E of a row within one
    # row of the grid, or one block of E neighbours).
    inverse = np.argsort(perm)
    physical = n_rows // expansion
    sharers = inverse[np.arange(physical)[:, None] + physical * np.arange(expansion)]  # [P, E]
    grid_rows = sharers // 32
    same_row = np.mean([len(set(r)) < expansion for r in grid_rows])
    assert same_row < 0.25  # random placement: P(two of 4 share one of 32 rows) ~ 0.18


def _core_loss_reference(cores, margin, weight):
    s = np.linalg.svd(cores.sum(1), compute_uv=False)  # [H, r], descending
    return weight * np.mean(np.maximum(s[:, 1:] - margin, 0.0) ** 2)


def test_core_penalty_matches_svd_and_its_gradient_lowers_it():
    layer, params, x, _, aux = _built("ultramem")
    cfg = CASES["ultramem"]
    cores = np.asarray(params["params"]["retrieval"]["core"], np.float64)
    loss = float(aux[TUCKER_LOSS])
    expected = _core_loss_reference(cores, cfg.tucker_margin, cfg.tucker_penalty)
    assert expected > 1e-3  # U(0, 1) cores of rank 3: some lambda_i > 0.15 for i >= 2
    assert loss == pytest.approx(expected, rel=1e-5)  # fp32 SVD of 3x3: ~1e-6 relative

    def penalty(p):
        return layer.apply(p, x)[1][TUCKER_LOSS]

    grad = jax.jit(jax.grad(penalty))(params)
    step = jax.tree.map(lambda a, g: a - 0.1 * g, params, grad)
    lowered = float(jax.jit(penalty)(step))
    # Armijo: a small step lowers the loss by at least half its first-order prediction
    # lr * |grad|^2 (a gradient pointing away from rank one would raise it).
    squared = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grad))
    assert squared > 0 and lowered < loss - 0.5 * 0.1 * squared
    # Only the cores feel the penalty.
    assert all(float(jnp.abs(g).max()) == 0.0 for path, g in
               jax.tree_util.tree_leaves_with_path(grad["params"]) if "core" not in str(path))
