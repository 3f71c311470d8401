"""Issue 13: every Pallas call runs inside `shard_map`, and sharded memory models are exact.

Op level: the value read of a replicated table (`memory_sharding=replicated`) and the gated
delta rule run per device inside `shard_map` over the batch (and heads), and equal the one-device
call forward and backward, with the Pallas kernels (interpret mode on CPU) and with the XLA path.
Model level: row-sharded non-shared tables, PEER on a sharded table, a memory under ZeRO-3 and a
replicated table train as the one-device model (losses, gradient norms, gradients, parameters).
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mnemax.layers.gated_delta import GatedDeltaConfig, GatedDeltaNet
from mnemax.layers.kernels.gated_delta import gated_delta_rule
from mnemax.layers.memory.values import read_expanded_values, read_values
from mnemax.parallel.mesh import make_mesh
from mnemax.parallel.rules import logical_axis_rules
from mnemax.parallel.strategy import Strategy
from tests.helpers import small_memory_recipe
from tests.helpers.equivalence import Run, assert_same_run, run_steps

MESH = "data:2,fsdp:2,tensor:2"  # tokens over data x fsdp (4 ways), replicated over tensor
TOKEN_AXES = ("data", "fsdp")
COLLECTIVE = re.compile(r"= \S+ (all-gather|all-to-all|collective-permute|reduce-scatter)\b")
# XLA:CPU compile time bounds these tests; LLVM's optimisation passes are most of it and change
# nothing that is checked here (as tests/kernels/test_gated_delta.py).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _sharded(strategy: Strategy, fn, *args):
    """`fn(*args)` compiled (`FAST_COMPILE`) and run on `strategy`'s mesh under its logical
    rules, the compiled HLO text, and the jaxpr of `fn`."""
    mesh = make_mesh(strategy)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_axis_rules(strategy)):
        compiled = jax.jit(fn).lower(*args).compile(FAST_COMPILE)
        return compiled(*args), compiled.as_text(), jax.make_jaxpr(fn)(*args)


def _subjaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def _primitives(jaxpr, inside_shard_map: bool = False):
    """`(primitive name, inside a shard_map?, params)` of every equation, nested ones too."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        yield name, inside_shard_map, eqn.params
        for sub in _subjaxprs(eqn.params):
            yield from _primitives(sub, inside_shard_map or name == "shard_map")


def _shard_map_specs(jaxpr) -> list[tuple]:
    """The `in_specs` of every shard_map, nested ones too (jax 0.10 and 0.12 both name the
    parameter `in_specs`)."""
    return [tuple(params["in_specs"]) for name, _, params in _primitives(jaxpr.jaxpr)
            if name == "shard_map"]


def _assert_kernels_in_shard_map(jaxpr, impl: str) -> None:
    found = [inside for name, inside, _ in _primitives(jaxpr.jaxpr) if name == "pallas_call"]
    if impl == "reference":
        assert not found, "the XLA path should run no Pallas kernel"
    else:
        assert found and all(found), f"{found.count(False)} of {len(found)} Pallas calls " \
                                     "run outside shard_map"


# ---------------------------------------------------------------------------------------------
# The value read of a replicated table.

ROWS, WIDTH, PICKS = 64, 16, 6


def _read_inputs(tokens: int):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    indices = rng.integers(0, ROWS, (tokens, PICKS)).astype(np.int32)
    weights = rng.normal(size=(tokens, PICKS)).astype(np.float32)
    probe = rng.normal(size=(tokens, WIDTH)).astype(np.float32)  # d loss / d out
    return table, indices, weights, probe


def _read_float64(table, indices, weights, probe):
    """Output, d table and d weights of `sum(probe * read)` in float64 numpy (no shared code)."""
    table, weights, probe = (np.asarray(x, np.float64) for x in (table, weights, probe))
    rows = table[indices]  # [T, J, d]
    out = np.einsum("tj,tjd->td", weights, rows)
    d_table = np.zeros_like(table)
    np.add.at(d_table, indices, weights[..., None] * probe[:, None, :])
    return out, d_table, np.einsum("td,tjd->tj", probe, rows)


@pytest.mark.parametrize("impl, tokens", [("pallas", 32), ("reference", 32), ("reference", 6)],
                         ids=["pallas", "xla", "xla-padded"])
def test_replicated_table_read_is_per_device_and_exact(impl, tokens):
    """`memory_sharding=replicated`: each device reads its own tokens' rows in `shard_map`.

    Tolerance: fp32, u = 6e-8. An output is a sum of J = 6 products of O(1) terms; a d_table row
    sums the weight x probe products of every pick of that row (here at most ~12, |terms| <= ~10)
    in an order the kernels and the cross-device sum choose: n u sum|terms| <= 12 x 6e-8 x 10
    = 7e-6. atol 2e-5 of the largest entry's magnitude (>= 1) with rtol 1e-5 covers both; a
    table gradient not summed over the 4 token shards is off by O(1).
    With 6 tokens (fewer than the 4 x 2 = 8 shards would split evenly) the read pads.
    """
    table, indices, weights, probe = _read_inputs(tokens)

    def value_and_grads(table, weights):
        out, vjp = jax.vjp(lambda t, w: read_values(t, indices, w, impl=impl), table, weights)
        return (out, *vjp(probe))

    got, hlo, jaxpr = _sharded(Strategy(mesh=MESH, memory_sharding="replicated"),
                               value_and_grads, table, weights)
    for name, g, w in zip(("out", "d_table", "d_weights"), got,
                          _read_float64(table, indices, weights, probe), strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5,
                                   atol=2e-5 * max(1.0, np.abs(w).max()), err_msg=name)
    token_spec = PartitionSpec(TOKEN_AXES)
    assert (PartitionSpec(), token_spec, token_spec) in _shard_map_specs(jaxpr)
    _assert_kernels_in_shard_map(jaxpr, impl)
    if tokens % 4 == 0:  # (padding and slicing a split array reshuffles it)
        # Under GSPMD the kernel's inputs are gathered to every device; in shard_map nothing but
        # the table gradient's all-reduce moves.
        assert not COLLECTIVE.findall(hlo), COLLECTIVE.findall(hlo)


# ---------------------------------------------------------------------------------------------
# The gated delta rule.

BATCH, TIME, HEADS, D_K, D_V, CHUNK = 4, 32, 4, 16, 16, 16
RULE_SPEC = PartitionSpec(TOKEN_AXES, None, "tensor", None)


def _rule_inputs():
    keys = jax.random.split(jax.random.key(0), 8)
    normal = lambda i, shape: jax.random.normal(keys[i], shape, jnp.float32)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(normal(0, (BATCH, TIME, HEADS, D_K)))
    k = unit(normal(1, (BATCH, TIME, HEADS, D_K)))
    v = normal(2, (BATCH, TIME, HEADS, D_V))
    g = -jax.random.uniform(keys[3], (BATCH, TIME, HEADS), minval=0.01, maxval=0.5)
    beta = jax.nn.sigmoid(normal(4, (BATCH, TIME, HEADS)))
    s0 = normal(5, (BATCH, HEADS, D_K, D_V))
    d_o = normal(6, (BATCH, TIME, HEADS, D_V))
    d_s = normal(7, (BATCH, HEADS, D_K, D_V))
    return (q, k, v, g, beta, s0), (d_o, d_s)


@pytest.mark.parametrize("impl", ["pallas", "reference"], ids=["pallas", "xla"])
def test_gated_delta_rule_is_per_device_and_equals_one_device(impl):
    """Batch over data x fsdp and heads over tensor: the rule runs in `shard_map` and equals the
    same rule on one device (output, final state, and the gradients of all six inputs).

    Both sides run the same fp32 (Pallas: bf16-operand) operations on each sequence and head;
    only XLA's blocking of the batched matmuls may differ with the local batch size, reordering
    sums of C = 16 or d = 16 terms: ~sqrt(16) u = 2.4e-7 of the terms' magnitude per product, a
    few products chained per chunk and two chunks: 1e-5 of each output's largest magnitude
    bounds it. A sequence or head computed with another's state or decay is off by O(1).
    """
    args, (d_o, d_s) = _rule_inputs()

    def value_and_grads(spec):
        def run(*args):
            def rule(q, k, v, g, beta, s0):
                return gated_delta_rule(q, k, v, g, beta, initial_state=s0,
                                        output_final_state=True, chunk_size=CHUNK, impl=impl,
                                        spec=spec)
            out, vjp = jax.vjp(rule, *args)
            return (*out, *vjp((d_o, d_s)))
        return run

    want = jax.jit(value_and_grads(None)).lower(*args).compile(FAST_COMPILE)(*args)
    got, hlo, jaxpr = _sharded(Strategy(mesh=MESH), value_and_grads(RULE_SPEC), *args)
    names = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "ds0")
    for name, a, b in zip(names, got, want, strict=True):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale,
                                   err_msg=name)
    act, state = PartitionSpec(TOKEN_AXES, None, "tensor"), PartitionSpec(TOKEN_AXES, "tensor")
    assert (act,) * 5 + (state,) in _shard_map_specs(jaxpr)
    _assert_kernels_in_shard_map(jaxpr, impl)
    assert not COLLECTIVE.findall(hlo), COLLECTIVE.findall(hlo)  # sequences never mix


def test_gated_delta_layer_runs_the_rule_per_device():
    """`GatedDeltaNet` hands the rule the split the logical rules give its activations (batch
    over data x fsdp, heads over tensor); traced only, so the test costs no compile."""
    layer = GatedDeltaNet(GatedDeltaConfig(num_heads=2, num_value_heads=4, head_dim=16,
                                           chunk_size=CHUNK, impl="pallas"))
    x = jnp.zeros((BATCH, TIME, 32), jnp.float32)
    params = jax.eval_shape(layer.init, jax.random.key(0), x)
    strategy = Strategy(mesh=MESH)
    with jax.set_mesh(make_mesh(strategy)), nn.logical_axis_rules(logical_axis_rules(strategy)):
        jaxpr = jax.make_jaxpr(lambda p, x: layer.apply(p, x)[0])(params, x)
    act = PartitionSpec(TOKEN_AXES, None, "tensor")
    assert (act,) * 5 in _shard_map_specs(jaxpr)
    _assert_kernels_in_shard_map(jaxpr, "pallas")


# ---------------------------------------------------------------------------------------------
# Whole memory models: sharded runs equal the one-device run.

# PEER (`peer_tiny` shrunk by SMALL and SMALL_MEMORY, one block: compile time is most of these
# tests) has two non-shared tables, the experts' up rows (`values`, read by the embedding bag)
# and their down rows (`expert_down`).
ONE_BLOCK = ("model.num_layers=1", "model.memory.layers=0")
_MODEL_RUNS: dict[tuple[str, ...], Run] = {}


def _peer_run(*overrides: str) -> Run:
    """`run_steps` of the one-block PEER model with `overrides` (no mesh override: one device),
    made once per process."""
    if overrides not in _MODEL_RUNS:
        devices = None if any(o.startswith("strategy.mesh=") for o in overrides) else (
            jax.devices()[:1])
        _MODEL_RUNS[overrides] = run_steps(
            small_memory_recipe("peer_tiny", *ONE_BLOCK, *overrides), devices)
    return _MODEL_RUNS[overrides]


def _table_shard(run: Run, name: str) -> tuple[int, ...]:
    return run.state.params["layer_0"]["memory"][name].addressable_shards[0].data.shape


def test_peer_on_row_sharded_tables_under_zero3_equals_one_device():
    """Row-sharded non-shared tables (`memory_sharding=rows`: each device reads the rows it owns,
    partial reads summed) with ZeRO-3 (the other weights' embed axis over fsdp), over data: 2 x
    fsdp: 4: losses, grad norms, gradients and parameters of the one-device run (tolerances:
    tests/helpers/equivalence.py)."""
    run = _peer_run("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3",
                    "strategy.memory_sharding=rows")
    assert _table_shard(run, "values") == (256 // 8, 64)  # no device holds a table whole
    assert _table_shard(run, "expert_down") == (256 // 8, 64)
    assert_same_run(run, _peer_run())


def test_replicated_table_equals_one_device():
    """`memory_sharding=replicated` over data: 4 x tensor: 2: every device holds the tables whole
    and reads its own tokens' rows in shard_map; the table gradient is summed over the 4 token
    shards once (not also over the tensor copies, which would double it and the grad norm)."""
    run = _peer_run("strategy.mesh=data:4,tensor:2", "strategy.memory_sharding=replicated")
    assert _table_shard(run, "values") == (256, 64)
    assert_same_run(run, _peer_run())


# ---------------------------------------------------------------------------------------------
# UltraMem's one-pass expanded read.

P_ROWS, EXP_WIDTH, CORES, EXPANSION, D_OUT = 16, 12, 3, 3, 7


def _expanded_inputs():
    rng = np.random.default_rng(3)
    t, j = 8, 5
    table = rng.standard_normal((P_ROWS, EXP_WIDTH)).astype(np.float32)
    rows = rng.integers(0, P_ROWS, (t, j)).astype(np.int32)
    rows[:, 0] = 5  # a row read by every token: its gradient sums over all of them
    which = rng.integers(0, EXPANSION, (t, j)).astype(np.int32)
    weights = rng.standard_normal((t, j, CORES)).astype(np.float32)
    projections = rng.standard_normal((EXPANSION, EXP_WIDTH, D_OUT)).astype(np.float32)
    probe = rng.standard_normal((t, D_OUT)).astype(np.float32)
    return table, rows, which, weights, projections, probe


def _expanded_float64(table, rows, which, weights, projections, probe):
    """out, and the gradients of sum(out * probe) w.r.t. table, weights, projections, by loops."""
    t_count, j_count = rows.shape
    part = EXP_WIDTH // CORES
    grouped = np.zeros((t_count, EXPANSION, EXP_WIDTH))
    d_table, d_weights = np.zeros(table.shape), np.zeros(weights.shape)
    for t in range(t_count):
        back = projections.astype(np.float64) @ probe[t].astype(np.float64)  # [E, d]
        for j in range(j_count):
            r, e = rows[t, j], which[t, j]
            for c in range(CORES):
                cols = slice(c * part, (c + 1) * part)
                grouped[t, e, cols] += weights[t, j, c] * table[r, cols]
                d_table[r, cols] += weights[t, j, c] * back[e, cols]
                d_weights[t, j, c] = table[r, cols] @ back[e, cols]
    out = np.einsum("tep,epv->tv", grouped, projections)
    d_projections = np.einsum("tep,tv->epv", grouped, probe)
    return out, d_table, d_weights, d_projections


@pytest.mark.parametrize("layout", ["rows", "dim", "replicated"])
def test_expanded_read_is_sharded_and_exact(layout):
    """`read_expanded_values` on a row-sharded, column-sharded (3-wide slices that cut through
    the 4-wide core parts) and replicated table over data x fsdp (4 ways) equals float64 loops,
    forward and the gradients of the table, the weights and the projections; no device gathers
    the table whole. Tolerance: each entry sums at most 8 x 5 x 3 fp32 products of O(1) terms
    (|sum| <= ~100): n u sum|terms| <= 120 x 6e-8 x 100 < 1e-3 absolute, 1e-5 relative; a
    part weighted by the wrong core, a pick read from another shard's rows or a gradient not
    summed over the shards is off by O(1)."""
    table, rows, which, weights, projections, probe = _expanded_inputs()

    def value_and_grads(table, weights, projections):
        out, vjp = jax.vjp(lambda t, w, p: read_expanded_values(t, p, rows, which, w),
                           table, weights, projections)
        return (out, *vjp(probe))

    got, hlo, jaxpr = _sharded(Strategy(mesh=MESH, memory_sharding=layout), value_and_grads,
                               table, weights, projections)
    want = _expanded_float64(table, rows, which, weights, projections, probe)
    for name, g, w in zip(("out", "d_table", "d_weights", "d_projections"), got, want,
                          strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-3, err_msg=name)
    assert any(name == "shard_map" for name, _, _ in _primitives(jaxpr.jaxpr))
    gathered = [line for line in hlo.splitlines()
                if "all-gather" in line and f"f32[{P_ROWS},{EXP_WIDTH}]" in line.split("=")[1]]
    assert not gathered, gathered
