"""Mixture-of-experts FFN (issue 14, stage 1): the layer against a float64 numpy loop over tokens
and experts (outputs, gradients, balance terms), capacity drops against the priority rule,
DeepSeek-V3's bias (selection only; its update balances the load), moe_tiny training, errors.

Tolerances. The layer runs in float32 (unit roundoff u = 6e-8); the reference in float64. An
output is at most four chained products over axes of length <= 8 (D, F, E), a softmax and a
SiLU; each dot of length n is off by <= n u sum|terms| (Higham, Thm. 3.1) and exp/SiLU by a few
ulps, so the accumulated error stays below ~40 u ~ 3e-6 of the magnitude of the terms. Gradients
add one more chain of the same length. rtol 2e-5 with atol 2e-5 x max|reference| is 7x that
bound; a wrong expert, a wrong weight or a pair in the wrong place moves an entry by O(1).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemax.errors import ConfigError
from mnemax.layers.components import FFNS, MODEL_STATE, STATE_STATS
from mnemax.layers.moe import MoEConfig, MoELayer
from mnemax.layers.moe.dispatch import capacity_positions
from mnemax.layers.roles import param_roles
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.data import eval_batches, train_iterator
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL

B, S, D, E, F, K = 2, 6, 8, 4, 6, 2  # T = 12 tokens
T = B * S


def _close(actual, expected, what):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=2e-5,
                               atol=2e-5 * max(np.abs(expected).max(), 1e-30), err_msg=what)


def _init(config, x, seed=0):
    """fp32 params (unboxed) and model state of a MoELayer at std 0.5 (routing and SiLU far
    from linear), and the module."""
    module = MoELayer(config, init_std=0.5, out_init_std=0.5)
    variables = nn.meta.unbox(module.init(jax.random.key(seed), x))
    return module, variables["params"], variables.get(MODEL_STATE, {})


def _inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, D), jnp.float32)


def _silu(z):
    return z / (1 + np.exp(-z))


def _swiglu(x, gate, up, down, dy=None):
    """SwiGLU of one token (float64), and with `dy` the gradients of <out, dy>."""
    hg, hu = x @ gate, x @ up
    a = _silu(hg) * hu
    if dy is None:
        return a @ down, None
    sig = 1 / (1 + np.exp(-hg))
    da = down @ dy
    dhg, dhu = da * hu * sig * (1 + hg * (1 - sig)), da * _silu(hg)
    return a @ down, {"gate": np.outer(x, dhg), "up": np.outer(x, dhu), "down": np.outer(a, dy),
                      "x": gate @ dhg + up @ dhu}


def _route(cfg, xs, router, bias):
    """Per token (float64): logits' logsumexp, router scores, balance-loss distribution P,
    chosen experts (best first) and their weights."""
    lse, scores, probs, choices, weights = [], [], [], [], []
    for t in range(T):
        logits = xs[t] @ router
        lse.append(np.log(np.sum(np.exp(logits))))
        if cfg.router == "softmax":
            score = np.exp(logits - lse[-1])
            prob, select = score, score
        else:
            score = 1 / (1 + np.exp(-logits))
            prob, select = score / score.sum(), score + (0 if bias is None else bias)
        choice = np.argsort(-select)[:K]
        w = score[choice] / (score[choice].sum() if cfg.normalizes else 1.0)
        for a, v in zip((scores, probs, choices, weights), (score, prob, choice, w), strict=True):
            a.append(v)
    return np.array(lse), np.array(scores), np.array(probs), np.array(choices), np.array(weights)


def _naive(cfg, params, x, bias=None, dropped=frozenset(), cotangent=None):
    """The MoE one token at a time in float64: loops over tokens, their k choices and the
    experts. Returns (out [B, S, D], aux, choices [T, k], and with `cotangent` [T, D] the
    gradients of sum(out * cotangent) + the two losses (softmax router, no renormalisation))."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "shared"}
    shared = {k: np.asarray(v, np.float64) for k, v in params.get("shared", {}).items()}
    xs = np.asarray(x, np.float64).reshape(T, D)
    lse, scores, probs, choices, weights = _route(cfg, xs, p["router"], bias)
    fraction = np.bincount(choices.reshape(-1), minlength=E) / (T * K)
    grads = {k: np.zeros_like(v) for k, v in p.items()} | {"x": np.zeros_like(xs)}
    grads["shared"] = {k: np.zeros_like(v) for k, v in shared.items()}
    out = np.zeros_like(xs)
    for t in range(T):
        dscore = np.zeros(E)
        experts = [(weights[t, j], p["gate"][e], p["up"][e], p["down"][e], e)
                   for j, e in enumerate(choices[t]) if (t, j) not in dropped]
        if shared:
            experts.append((1.0, shared["gate"], shared["up"], shared["down"], None))
        for w, gate, up, down, e in experts:
            dy = None if cotangent is None else w * cotangent[t]
            y, g = _swiglu(xs[t], gate, up, down, dy)
            out[t] += w * y
            if g is None:
                continue
            into = grads if e is not None else grads["shared"]
            for name in ("gate", "up", "down"):
                if e is None:
                    into[name] += g[name]
                else:
                    into[name][e] += g[name]
            grads["x"][t] += g["x"]
            if e is not None:
                dscore[e] += cotangent[t] @ y
        if cotangent is not None:
            assert cfg.router == "softmax" and not cfg.normalizes
            # d/dp_t of alpha E sum_e f_e mean_t p_te is alpha E f / T; the softmax's Jacobian
            # is p (dp - p.dp); d lse^2 / dlogits = 2 lse p, and the z-loss is a mean over T.
            p_t = scores[t]
            dp = dscore + cfg.load_balance_weight * E * fraction / T
            dlogits = p_t * (dp - p_t @ dp) + cfg.z_loss_weight * 2 * lse[t] * p_t / T
            grads["router"] += np.outer(xs[t], dlogits)
            grads["x"][t] += p["router"] @ dlogits
    counts = fraction * T * K
    aux = {"loss/moe_load_balance": cfg.load_balance_weight * E * np.sum(
               fraction * probs.mean(0)),
           "loss/moe_router_z": cfg.z_loss_weight * np.mean(np.square(lse)),
           "moe/max_load": counts.max() / counts.mean(),
           "moe/dropped_fraction": len(dropped) / (T * K)}
    return out.reshape(B, S, D), aux, choices, grads if cotangent is not None else None


@pytest.mark.parametrize("case", ["shared_expert", "empty_expert"])
def test_dropless_output_and_gradients_equal_a_naive_loop(case):
    cfg = MoEConfig(num_experts=E, topk=K, expert_dim=F, router="softmax",
                    num_shared_experts=1 if case == "shared_expert" else 0,
                    load_balance_weight=0.3, z_loss_weight=0.2)
    x = _inputs()
    module, params, _ = _init(cfg, x)
    if case == "empty_expert":
        # Expert 3's logit is ~ -10 for every token: its group is empty (ragged_dot's edge).
        x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 2.0)
        params = dict(params, router=params["router"].at[0, 3].set(-5.0))
        assert not (_naive(cfg, params, x)[2] == 3).any()
    cot = np.asarray(jax.random.normal(jax.random.key(7), (T, D)), np.float64)
    ref, ref_aux, _, ref_grads = _naive(cfg, params, x, cotangent=cot)

    def objective(params, x):
        out, aux = module.apply({"params": params}, x)
        return (jnp.sum(out.reshape(T, D) * cot.astype(np.float32))
                + aux["loss/moe_load_balance"] + aux["loss/moe_router_z"]), (out, aux)

    (_, (out, aux)), (grads, dx) = jax.value_and_grad(objective, argnums=(0, 1),
                                                       has_aux=True)(params, x)
    _close(out, ref, "output")
    for name, value in ref_aux.items():
        np.testing.assert_allclose(float(aux[name]), value, rtol=2e-5, err_msg=name)
    _close(dx.reshape(T, D), ref_grads["x"], "d x")
    for name in ("router", "gate", "up", "down"):
        _close(grads[name], ref_grads[name], f"d {name}")
    for name, value in ref_grads["shared"].items():
        _close(grads["shared"][name], value, f"d shared/{name}")
    assert float(aux["moe/dropped_fraction"]) == 0.0


def _capacity_drops(choices, capacity):
    """(t, j) pairs past their expert's capacity, first choices of all tokens (in token order)
    queued before second choices (GShard/Switch)."""
    taken, dropped = np.zeros(E, int), set()
    for j in range(K):
        for t in range(T):
            e = choices[t, j]
            if taken[e] >= capacity:
                dropped.add((t, j))
            taken[e] += 1
    return frozenset(dropped)


def test_capacity_drops_exactly_the_pairs_the_formula_says():
    cfg = MoEConfig(num_experts=E, topk=K, expert_dim=F, dispatch="capacity",
                    capacity_factor=0.75)
    assert cfg.capacity(T) == math.ceil(0.75 * T * K / E) == 5
    x = _inputs(3)
    module, params, _ = _init(cfg, x)
    # Skew the router to expert 1 so that it overflows.
    x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
    params = dict(params, router=params["router"].at[0, 1].add(2.0))
    _, _, choices, _ = _naive(cfg, params, x)
    dropped = _capacity_drops(choices, 5)
    # Both a first and a second choice are dropped, and several are kept: a non-trivial set.
    assert {j for _, j in dropped} == {0, 1} and 0 < len(dropped) < T * K // 2, dropped
    _, keep = capacity_positions(jnp.asarray(choices, jnp.int32), E, 5)
    assert {(t, j) for t in range(T) for j in range(K) if not keep[t, j]} == dropped

    out, aux = module.apply({"params": params}, x)
    ref, ref_aux, _, _ = _naive(cfg, params, x, dropped=dropped)
    _close(out, ref, "capacity output (kept pairs as dropless, dropped ones 0)")
    for name, value in ref_aux.items():  # balance terms and max load count pairs before drops
        np.testing.assert_allclose(float(aux[name]), value, rtol=2e-5, err_msg=name)
    # Capacity for every pair: the same as dropless.
    roomy = dataclasses.replace(cfg, capacity_factor=E / K)
    dropless = dataclasses.replace(cfg, dispatch="dropless")
    out_roomy, aux_roomy = module.clone(config=roomy).apply({"params": params}, x)
    _close(out_roomy, module.clone(config=dropless).apply({"params": params}, x)[0], "roomy")
    assert float(aux_roomy["moe/dropped_fraction"]) == 0.0


def test_sigmoid_selection_uses_the_bias_and_the_weights_do_not():
    cfg = MoEConfig(num_experts=E, topk=K, expert_dim=F, router="sigmoid",
                    bias_update_rate=0.01, load_balance_weight=0.3, z_loss_weight=0.2)
    assert cfg.normalizes  # DeepSeek-V3's default
    x = _inputs(4)
    module, params, state = _init(cfg, x)
    np.testing.assert_array_equal(state["expert_bias"], 0.0)
    bias = np.array([0.0, 0.0, 0.0, 3.0], np.float32)  # larger than any sigmoid gap: always picked
    out, aux = module.apply({"params": params, MODEL_STATE: {"expert_bias": bias}}, x)
    ref, ref_aux, choices, _ = _naive(cfg, params, x, bias=bias)
    assert (choices == 3).any(axis=1).all()
    unbiased_choices = _naive(cfg, params, x)[2]
    assert not (unbiased_choices == 3).any(axis=1).all()  # the bias changed the choice
    _close(out, ref, "sigmoid output")
    for name, value in ref_aux.items():
        np.testing.assert_allclose(float(aux[name]), value, rtol=2e-5, err_msg=name)
    # A layer whose weights used score + bias would differ by O(1) (bias 3 vs scores < 1).
    biased_weights = _naive_weights_with_bias(cfg, params, x, bias)
    assert np.abs(biased_weights - np.asarray(ref)).max() > 0.1


def _naive_weights_with_bias(cfg, params, x, bias):
    """The wrong implementation: weights from sigmoid + bias (renormalised)."""
    xs = np.asarray(x, np.float64).reshape(T, D)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    out = np.zeros_like(xs)
    for t in range(T):
        score = 1 / (1 + np.exp(-(xs[t] @ p["router"]))) + bias
        choice = np.argsort(-score)[:K]
        w = score[choice] / score[choice].sum()
        for j, e in enumerate(choice):
            out[t] += w[j] * _swiglu(xs[t], p["gate"][e], p["up"][e], p["down"][e])[0]
    return out.reshape(B, S, D)


def test_bias_updates_move_load_toward_balance():
    """DeepSeek-V3's update, step by step from the recorded loads, on a router skewed to
    expert 0 (every token picks it: max load = T / (T K / E) = 2)."""
    cfg = MoEConfig(num_experts=E, topk=K, expert_dim=F, router="sigmoid",
                    bias_update_rate=0.05)
    component = FFNS["moe"](cfg)
    x = _inputs(5)
    module, params, state = _init(cfg, x)
    x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
    params = dict(params, router=params["router"].at[0, 0].add(3.0))
    apply = functools.partial(module.apply, mutable=[STATE_STATS])
    loads = []
    for _ in range(12):
        (_, aux), stats = apply({"params": params, MODEL_STATE: state}, x)
        loads.append(float(aux["moe/max_load"]))
        counts = np.asarray(stats[STATE_STATS]["expert_load"])
        assert counts.sum() == T * K
        new = component.update_state(state, stats[STATE_STATS])
        np.testing.assert_allclose(  # the rule itself: +-rate by the sign of mean - load
            new["expert_bias"], state["expert_bias"] + 0.05 * np.sign(counts.mean() - counts))
        state = new
    print("max load per step:", loads)
    # Loads are exact: count / 6 (mean of 24 pairs over 4 experts). Measured: 2.0 for 4 steps,
    # then 1.83, 1.5, 1.33, 1.5 as the bias of expert 0 sinks by 0.05 a step.
    assert loads[0] == 2.0
    assert loads[-1] <= 1.5 and min(loads) < loads[0], loads


def test_moe_tiny_trains_and_its_experts_matter():
    recipe = load_recipe("moe_tiny", [*SMALL, "model.moe.layers=0,1", "model.moe.expert_dim=64"])
    assert recipe.model.uniform_blocks  # every block holds the MoE: nn.scan stacks them
    program = build_program(recipe, jax.devices()[:1])
    state = program.init(jax.random.key(0))
    data = train_iterator(recipe.data, process_index=0, process_count=1)
    metrics = []
    for _ in range(30):
        state, m = program.train_step(state, program.global_batch(next(data)))
        metrics.append({k: float(v) for k, v in m.items()})
    # From ~ln 320 = 5.77 nats (uniform) 30 steps of 16 x 32 stdlib bytes reach ~3.3 (measured
    # 5.72 -> 3.33): a 1.5-nat drop leaves 0.8 nats of slack, and a model that cannot learn
    # (a dispatch that scrambles rows, a NaN, frozen experts and router) stays near 5.7.
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 1.5, (metrics[0], metrics[-1])
    assert 1.0 <= metrics[-1]["moe/max_load"] <= E
    assert metrics[-1]["moe/dropped_fraction"] == 0.0
    # Two blocks' weighted balance losses, each alpha x (>= 1 up to rounding).
    assert metrics[-1]["loss/moe_load_balance"] >= 2 * 0.01 * 0.999
    # Zeroing every expert's down projection makes the MoE output exactly 0. The loss of a
    # step is computed from the params before its update, so the train step (already compiled)
    # evaluates both on held-out batches; that is deterministic (same program, same batches),
    # so experts the model ignored would move it by ~1e-6 (fp32 reordering). After 30 steps the
    # FFNs matter little yet (measured 3.613 -> 3.624 nats), so the bound is 1e-3: 1000x the
    # noise, 11x below the measured effect.
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if jax.tree_util.keystr(path).endswith(
            "['moe']['down']") else a, state.params)
    assert sum(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(zeroed), jax.tree.leaves(state.params), strict=True)) == 1
    batches = [program.global_batch(b) for b in eval_batches(recipe.data, 2)]

    def held_out_loss(params):  # the step donates its state: each call gets a copy
        return np.mean([float(program.train_step(
            jax.tree.map(jnp.copy, state.replace(params=params)), b)[1]["loss"])
            for b in batches])

    trained, without = held_out_loss(state.params), held_out_loss(zeroed)
    print(f"moe_tiny: loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}; validation "
          f"{trained:.4f}, without the experts {without:.4f}")
    assert without - trained > 1e-3, (trained, without)


def test_component_counts_roles_and_scanned_state():
    recipe = load_recipe("moe_fine_tiny", [*SMALL, "model.moe.layers=0,1",
                                           "model.moe.num_experts=8", "model.moe.topk=3",
                                           "model.moe.expert_dim=16"])
    model = recipe.model
    boxed = jax.eval_shape(model.build().init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    params = nn.meta.unbox(boxed["params"])
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(params)) == model.param_count()
    d, e, f = 64, 8, 16  # SMALL's width, and the experts above
    moe = params["layers"]["block"]["moe"]
    assert moe["router"].shape == (2, d, e) and moe["gate"].shape == (2, e, d, f)
    assert moe["down"].shape == (2, e, f, d) and moe["shared"]["gate"].shape == (2, d, f)
    assert "mlp" not in params["layers"]["block"]  # mode=replace: no dense FFN
    # mode=parallel: beside a dense FFN of SMALL's 128 x ffn_ratio, counted too.
    parallel = dataclasses.replace(model, moe=dataclasses.replace(model.moe, mode="parallel",
                                                                  ffn_ratio=0.5))
    both = nn.meta.unbox(jax.eval_shape(parallel.build().init, jax.random.key(0),
                                        jnp.zeros((2, 8), jnp.int32))["params"])
    assert both["layers"]["block"]["mlp"]["up"].shape == (2, d, 64)
    assert sum(math.prod(a.shape) for a in jax.tree.leaves(both)) == parallel.param_count()
    # Active training FLOPs: 6 x (router d e + (top-3 + 1 shared) x 3 d f) per MoE block.
    ctx = model.block_context(0)
    assert FFNS["moe"](model.moe).flops_per_token(ctx, 32) == 6 * (d * e + 4 * 3 * d * f)
    roles = param_roles(boxed["params"])["layers"]["block"]["moe"]
    assert {roles[n] for n in ("router", "gate", "up", "down")} == {"matrix"}
    # The balancing bias: one [E] per scanned block, outside the parameters; the model's update
    # (vmapped over the blocks) moves it from this batch's loads.
    state = nn.meta.unbox(boxed[MODEL_STATE])["layers"]["block"]["moe"]["expert_bias"]
    assert state.shape == (2, e)
    # Traced, not run: each block records its [E] loads in STATE_STATS, stacked by nn.scan.
    tokens = jnp.zeros((4, 16), jnp.int32)
    recorded = jax.eval_shape(lambda v: model.build().apply(v, tokens, mutable=[STATE_STATS])[1],
                              nn.meta.unbox(boxed))
    assert recorded[STATE_STATS]["layers"]["block"]["moe"]["expert_load"].shape == (2, e)
    # Its remat tag is in the traced model, so save_names / offload_names policies can use it.
    assert FFNS["moe"].remat_names == ("moe_out",)
    jaxpr = str(jax.make_jaxpr(lambda v: model.build().apply(v, tokens))(nn.meta.unbox(boxed)))
    assert "name=moe_out" in jaxpr
    loads = np.array([[9, 1, 6, 6, 6, 6, 6, 8], [0, 0, 12, 12, 4, 8, 4, 8]], np.float32)
    new = model.update_model_state(
        {"layers": {"block": {"moe": {"expert_bias": jnp.zeros((2, e))}}}},
        {"layers": {"block": {"moe": {"expert_load": loads}}}})
    np.testing.assert_array_equal(  # rate 0.001 by the sign of (block mean - load), per block
        new["layers"]["block"]["moe"]["expert_bias"],
        np.float32(0.001) * np.array([[-1, 1, 0, 0, 0, 0, 0, -1], [1, 1, -1, -1, 1, -1, 1, -1]],
                                     np.float32))


@pytest.mark.parametrize("override, message", [
    ("model.moe.topk=9", r"model\.moe\.topk=9 exceeds model\.moe\.num_experts=8"),
    ("model.moe.router=tanh", r"model\.moe\.router='tanh' is unknown; choose one of softmax, "
                              "sigmoid"),
    ("model.moe.bias_update_rate=0.01", r"model\.moe\.bias_update_rate=0\.01 .* set "
                                        r"model\.moe\.router=sigmoid"),
    ("model.moe.layers=0,5", r"model\.moe\.layers=\(0, 5\) names blocks \[5\]"),
])
def test_bad_config_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("moe_tiny", [*SMALL, "model.moe.layers=0,1", override]).model.build()
    with pytest.raises(ConfigError, match=r"model\.moe\.router='x' is unknown"):
        MoEConfig(router="x")


def test_moe_8x_1b_matches_memory_plus_1b_in_total_and_active_size():
    """The memory-vs-MoE comparison needs equal total parameters and equal active compute
    (issue 14: within 10%); measured 3.121B vs 3.148B and 6.04 vs 6.01 GFLOP per token."""
    moe, memory = (load_recipe(name).model for name in ("moe_8x_1b", "memory_plus_1b"))
    assert moe.param_count() == pytest.approx(memory.param_count(), rel=0.10)
    assert moe.flops_per_token(2048) == pytest.approx(memory.flops_per_token(2048), rel=0.10)
    assert moe.param_count() > 2.5 * moe.flops_per_token(2048) / 6  # sparse: total >> active
