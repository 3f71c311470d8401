"""The ZeRO layout (`mnemax.parallel.zero.zero_layout`) on data x fsdp meshes: per-device state
bytes against a formula counted from the parameter shapes, the shard nesting that keeps the
stage-3 update local, and a stage-3 train step that equals stage 0."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mnemax.parallel.zero import spread_over_data_parallel, zero_layout
from mnemax.trainer.checkpoint import abstract_with_shardings
from mnemax.trainer.setup import build_program

MESHES = [(2, 4), (4, 2)]  # (data, fsdp)


def _program(small_recipe, data: int, fsdp: int, stage: int, *extra: str):
    return build_program(small_recipe(f"strategy.mesh=data:{data},fsdp:{fsdp}",
                                      f"strategy.zero_stage={stage}", *extra))


def _expected_bytes(program, stage: int, data: int, fsdp: int) -> dict[str, int]:
    """ZeRO's bytes per device, counted from the shapes alone (fp32 params, grads and Adam's two
    fp32 moments). Every dimension of this small model that the layout may split (d_model 64,
    mlp 128, vocab 320) divides data x fsdp = 8, so each leaf splits exactly and no leaf is left
    whole: the formula is exact. The only whole leaves are the optimizer's scalar counters,
    which every device holds (counted explicitly)."""
    state = program.abstract_state
    whole = sum(4 * math.prod(p.shape) for p in jax.tree.leaves(state.params))
    opt_leaves = jax.tree.leaves(state.opt_state)
    counters = sum(np.dtype(x.dtype).itemsize for x in opt_leaves if x.ndim == 0)
    # Adam: the non-scalar optimizer state is exactly two parameter-shaped fp32 moments.
    assert sum(4 * math.prod(x.shape) for x in opt_leaves if x.ndim) == 2 * whole
    n = data * fsdp
    return {
        "params_bytes": whole // fsdp if stage == 3 else whole,
        "grads_bytes": whole // n if stage >= 2 else whole,
        "opt_state_bytes": 2 * whole // (n if stage >= 1 else 1) + counters,
    }


@pytest.mark.parametrize("data, fsdp", MESHES)
def test_state_bytes_shrink_with_each_stage_and_match_the_formula(small_recipe, data, fsdp):
    got = {stage: _program(small_recipe, data, fsdp, stage).memory_per_device()
           for stage in range(4)}
    for stage in range(4):
        # Exact: integer bytes of leaves that all split evenly (see _expected_bytes).
        expected = _expected_bytes(_program(small_recipe, data, fsdp, stage), stage, data, fsdp)
        assert got[stage] == expected, stage
    for kind in ("params_bytes", "grads_bytes", "opt_state_bytes"):
        assert got[3][kind] <= got[2][kind] <= got[1][kind] <= got[0][kind], kind
    # Stage 3's gain over stage 2 is the parameters, split over fsdp only.
    assert got[3]["params_bytes"] * fsdp == got[2]["params_bytes"]


def _flat(shardings) -> list[NamedSharding]:
    return jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def _index_ranges(sharding: NamedSharding, shape: tuple[int, ...]) -> dict:
    """device -> per-dimension (start, stop) of the block it holds."""
    return {d: tuple(s.indices(n)[:2] for s, n in zip(idx, shape, strict=True))
            for d, idx in sharding.devices_indices_map(shape).items()}


@pytest.mark.parametrize("data, fsdp", MESHES)
def test_stage3_gradient_and_moment_shards_lie_inside_the_parameter_shard(small_recipe, data,
                                                                         fsdp):
    """Each device's slice of the gradients and moments is part of the parameter slice it
    holds, so the update needs no parameter from another device before the all-gather over
    data. Caught: ("data", "fsdp") instead of ("fsdp", "data") on the embed dimension."""
    program = _program(small_recipe, data, fsdp, 3)
    params = program.abstract_state.params
    layout = zero_layout(3, params, program.state_shardings.params)
    for leaf, p_sh, g_sh, o_sh in zip(jax.tree.leaves(params), _flat(layout.params),
                                      _flat(layout.grads), _flat(layout.opt_state_like_params),
                                      strict=True):
        p_blocks = _index_ranges(p_sh, leaf.shape)
        assert g_sh == o_sh
        for device, block in _index_ranges(o_sh, leaf.shape).items():
            assert all(p0 <= b0 and b1 <= p1
                       for (b0, b1), (p0, p1) in zip(block, p_blocks[device], strict=True))
            # and it is 1/(data x fsdp) of the leaf: no leaf of this model is left whole.
            assert math.prod(b1 - b0 for b0, b1 in block) * data * fsdp == math.prod(leaf.shape)


def test_spread_adds_the_missing_axes_and_leaves_what_nothing_divides():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def spread(shape, *spec, memory_kind=None):
        sharding = NamedSharding(mesh, PartitionSpec(*spec), memory_kind=memory_kind)
        out = spread_over_data_parallel(jax.ShapeDtypeStruct(shape, np.float32), sharding)
        return out.spec, out.memory_kind

    device = spread((1,), None)[1]
    # Split over fsdp on a dim 8 divides: data goes after fsdp on that dim.
    assert spread((16, 6), "fsdp") == (PartitionSpec(("fsdp", "data"), None), device)
    # 8 does not divide 4: data goes on the free dim that 2 divides.
    assert spread((4, 6), "fsdp") == (PartitionSpec("fsdp", "data"), device)
    # Nothing divides: the leaf stays as it is (its moments only over fsdp).
    assert spread((4, 3), "fsdp") == (PartitionSpec("fsdp"), device)
    # Replicated: data x fsdp on the largest dim 8 divides; scalars and odd sizes stay whole.
    assert spread((8, 24), None, None) == (PartitionSpec(None, ("data", "fsdp")), device)
    assert spread((3, 5), None, None) == (PartitionSpec(None, None), device)
    assert spread((), ) == (PartitionSpec(), device)
    # Already over data x fsdp (memory value tables): unchanged; the memory kind is kept.
    assert spread((16, 4), ("data", "fsdp"), memory_kind="pinned_host") == (
        PartitionSpec(("data", "fsdp")), "pinned_host")
    assert spread((16, 6), "fsdp", memory_kind="pinned_host")[1] == "pinned_host"


def _sharding_constraints(jaxpr, found: set) -> None:
    """(shape, spec) of every sharding constraint in `jaxpr` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            found.add((tuple(eqn.invars[0].aval.shape), eqn.params["sharding"].spec))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _sharding_constraints(inner, found)


def _train(program, state, steps: int = 3):
    rng = np.random.default_rng(0)
    losses, grad_norms = [], []
    for _ in range(steps):
        batch = rng.integers(0, 257, (16, 33), dtype=np.int32)
        state, metrics = program.train_step(state, program.global_batch(batch))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return losses, grad_norms, state


def test_stage3_step_lays_gradients_out_like_moments_and_matches_stage0(small_recipe):
    stage3 = _program(small_recipe, 2, 4, 3)
    # The step constrains the gradients to the layout's data x fsdp split (a reduce-scatter).
    state = abstract_with_shardings(stage3.abstract_state, stage3.state_shardings)
    batch = jax.ShapeDtypeStruct((16, 33), np.int32, sharding=stage3.batch_sharding)
    with jax.set_mesh(stage3.mesh):
        closed = jax.make_jaxpr(stage3.train_step.jitted)(state, batch)
    found: set = set()
    _sharding_constraints(closed.jaxpr, found)
    for leaf, sharding in zip(jax.tree.leaves(stage3.abstract_state.params),
                              _flat(stage3.grad_shardings), strict=True):
        assert (tuple(leaf.shape), sharding.spec) in found, sharding.spec

    # fp32 throughout: the stage-0 all-reduce and the stage-3 reduce-scatter sum the same 8
    # partial gradients in different orders, a relative difference of a few float32 ulps
    # (~1e-6 after 3 steps of 64-wide matmuls). Adam's update lr * m / (sqrt(v) + eps) is
    # scale-free in the gradient, so params and losses move by ~lr x 1e-6; grad_norm (a sum of
    # squares) by ~1e-6 relative. 1e-5 leaves a 10x margin; a gradient of the wrong scale or a
    # shard summed twice moves grad_norm by far more.
    stage0 = _program(small_recipe, 2, 4, 0)
    # One init for both (the same values; stage 3's copy is resharded), which saves a compile.
    initial = stage0.init(jax.random.key(0))
    laid_out = jax.device_put(initial, stage3.state_shardings, may_alias=False)
    base_losses, base_norms, base_state = _train(stage0, initial)
    losses, norms, state = _train(stage3, laid_out)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norms, base_norms, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(base_state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # And the state really is split: q over fsdp = 4, its Adam moment over data x fsdp = 8.
    q = state.params["layers"]["block"]["attn"]["q"]
    assert q.addressable_shards[0].data.size * 4 == q.size
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == q.shape]
    assert moments and all(m.addressable_shards[0].data.size * 8 == m.size for m in moments)
