"""Expert parallelism on 8 fake devices: the token exchange (`exchange_through_experts`) equals
every pair through its expert on one device, forward and gradients, dropless and with drops;
moe_tiny over expert:4 with ZeRO-3 over fsdp trains as on one device, the expert axis splitting
the other layers' batch; tensor parallelism is refused; moe_tiny's step compiles for TPU with
megablox."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnemax.errors import ConfigError
from mnemax.launch import compile as tpu_compile
from mnemax.layers.kernels.dispatch import TPU_CUSTOM_CALL
from mnemax.layers.kernels.grouped_matmul import grouped_matmul
from mnemax.layers.moe import expert_parallel
from mnemax.layers.moe.expert_parallel import exchange_through_experts
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.memory_report import lower_train_step
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL
from tests.helpers.equivalence import assert_same_run, run_steps

E, D, F, K = 8, 16, 24, 2
TOKENS = 40  # 5 per device: tokens split over data x expert


def _swiglu_rows(rows, group_sizes, w_gate, w_up, w_down):
    mm = lambda a, w: grouped_matmul(a, w, group_sizes, impl="reference")
    return mm(jax.nn.silu(mm(rows, w_gate)) * mm(rows, w_up), w_down)


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((TOKENS, D)).astype(np.float32)
    # Skewed: half the pairs go to expert 5, so one device receives far more than its share.
    index = np.where(rng.random((TOKENS, K)) < 0.5, 5, rng.integers(0, E, (TOKENS, K)))
    index[:, 1] = np.where(index[:, 1] == index[:, 0], (index[:, 0] + 1) % E, index[:, 1])
    w = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in ((E, D, F), (E, D, F),
                                                                  (E, F, D))]
    probe = rng.standard_normal((TOKENS, K, D)).astype(np.float32)
    return x, index.astype(np.int32), w, probe


def _float64(x, index, keep, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_gate, w_up, w_down))
    y = np.zeros((TOKENS, K, D))
    for t in range(TOKENS):
        for j in range(K):
            if keep[t, j]:
                e = index[t, j]
                g = x[t] @ w_gate[e]
                y[t, j] = (g / (1 + np.exp(-g)) * (x[t] @ w_up[e])) @ w_down[e]
    return y


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all` as its docstring defines it, from `all_gather` (XLA:CPU has
    no ragged collective): every slice l of every source s whose destination is this device is
    written at the offset the source gave. Its transpose comes from autodiff."""
    n = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    gathered = [jax.lax.all_gather(a, axis_name) for a in
                (operand, input_offsets, send_sizes, output_offsets)]
    operands, starts, sizes, landings = gathered
    per_device = input_offsets.shape[0] // n
    # The sizes a receiver is told must be what its sources send (the collective's contract).
    told = jax.lax.all_to_all(recv_sizes, axis_name, 0, 0, tiled=True)
    output = output + 0 * jnp.sum(told - send_sizes)  # ties the check into the program
    row = jnp.arange(operand.shape[0])
    # inside[s, l, m]: row m of source s is in its slice l; slices of one source are disjoint.
    inside = ((row >= starts[..., None]) & (row < (starts + sizes)[..., None])
              & (jnp.arange(input_offsets.shape[0]) // per_device == me)[None, :, None])
    shift = jnp.sum(jnp.where(inside, (landings - starts)[..., None], 0), axis=1)  # [n, M]
    target = jnp.where(jnp.any(inside, axis=1), row + shift, output.shape[0])
    output = output.at[target.reshape(-1)].set(operands.reshape(-1, operand.shape[-1]),
                                               mode="drop")
    return output


@pytest.mark.parametrize(("exchange", "dropped"), [("padded", False), ("padded", True),
                                                   ("ragged", True)],
                         ids=["padded-dropless", "padded-with-drops", "ragged-with-drops"])
def test_exchange_equals_one_device(exchange, dropped, monkeypatch):
    """Tolerance: fp32 products of <= 24 terms, two layers: ~1e-6 relative; a pair sent to the
    wrong device, read from the wrong slot, or a gradient not returned is off by O(0.1). The
    ragged exchange runs its index arithmetic with an emulated collective (the real one is
    checked by the TPU compile below)."""
    monkeypatch.setattr(expert_parallel, "_ragged_exchange", functools.partial(
        expert_parallel._ragged_exchange, ragged_all_to_all=_emulated_ragged_all_to_all))
    x, index, (w_gate, w_up, w_down), probe = _inputs()
    keep = np.ones((TOKENS, K), bool)
    if dropped:
        keep[::3, 1] = False
        keep[7] = False
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    tokens, experts = PartitionSpec(("data", "expert")), PartitionSpec("expert")

    def local(x, index, keep, w_gate, w_up, w_down):
        fn = lambda rows, sizes: _swiglu_rows(rows, sizes, w_gate, w_up, w_down)
        return exchange_through_experts(x, index, keep, fn, num_experts=E, axis="expert",
                                        exchange=exchange)

    def loss_and_out(x, w_gate, w_up, w_down):
        y = jax.shard_map(local, mesh=mesh,
                          in_specs=(tokens, tokens, tokens, experts, experts, experts),
                          out_specs=tokens)(x, index, keep, w_gate, w_up, w_down)
        return jnp.sum(y * probe), y

    with jax.set_mesh(mesh):
        args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in
                ((x, tokens), (w_gate, experts), (w_up, experts), (w_down, experts))]
        (_, y), grads = jax.jit(jax.value_and_grad(loss_and_out, (0, 1, 2, 3),
                                                   has_aux=True))(*args)
    want = _float64(x, index, keep, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(y)[~keep].any()

    def one_device(x, w_gate, w_up, w_down):  # every kept pair through its expert, directly
        y = jnp.einsum("td,tjdf->tjf", x, w_gate[index])
        y = jax.nn.silu(y) * jnp.einsum("td,tjdf->tjf", x, w_up[index])
        y = jnp.einsum("tjf,tjfd->tjd", y, w_down[index]) * keep[..., None]
        return jnp.sum(y * probe)

    want_grads = jax.grad(one_device, (0, 1, 2, 3))(x, w_gate, w_up, w_down)
    for name, g, w in zip(("x", "w_gate", "w_up", "w_down"), grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(w).max()), err_msg=name)


# moe_tiny shrunk as the other equivalence tests shrink `tiny` (2 blocks of width 64), its 8
# experts 96 wide: under expert:4 each device holds 2 of them.
MOE = ("model.moe.layers=0,1", "model.moe.expert_dim=96")


def _moe_run(*overrides: str, one_device: bool = False):
    recipe = load_recipe("moe_tiny", [*SMALL, *MOE, *overrides])
    return run_steps(recipe, jax.devices()[:1] if one_device else None)


def test_moe_model_with_expert_parallelism_and_zero3_equals_one_device(monkeypatch):
    """moe_tiny with its experts split over expert:4 (tokens exchanged by all-to-all) and ZeRO-3
    over fsdp:2: losses, grad norms, gradients and parameters of the one-device run
    (tolerances: tests/helpers/equivalence.py). The expert axis is data parallel for the other
    layers (as in MaxText): the batch is split over fsdp x expert, and their Adam moments over
    the 8 devices. (Capacity drops under expert parallelism go through the same exchange:
    `test_exchange_equals_one_device[with-drops]`.)"""
    exchanges = []  # the experts' work must go through the exchange, not gathered weights

    def exchange(*args, **kwargs):
        exchanges.append(kwargs["axis"])
        return exchange_through_experts(*args, **kwargs)

    monkeypatch.setattr(expert_parallel, "exchange_through_experts", exchange)
    run = _moe_run("strategy.mesh=fsdp:2,expert:4", "strategy.zero_stage=3")
    assert exchanges and set(exchanges) == {"expert"}
    monkeypatch.undo()
    assert_same_run(run, _moe_run(one_device=True))
    block = run.state.params["layers"]["block"]
    assert block["moe"]["gate"].addressable_shards[0].data.shape[1] == 2  # 2 of 8 experts each
    assert run.program.batch_sharding.spec == PartitionSpec(("data", "fsdp", "expert"))
    q = block["attn"]["q"]
    moments = [leaf for leaf in jax.tree.leaves(run.state.opt_state) if leaf.shape == q.shape]
    assert moments and all(m.addressable_shards[0].data.size * 8 == m.size for m in moments)


def test_moe_under_tensor_parallelism_is_refused_with_the_alternative():
    with pytest.raises(ConfigError, match=r"tensor parallelism .* not supported.*expert:4"):
        _moe_run("strategy.mesh=data:4,tensor:2")


def test_moe_tiny_step_compiles_for_tpu_with_megablox():
    """moe_tiny at its own widths (256 -> 384: whole 128-lane tiles) on v5e:2x2 with its experts
    over expert:2: the train step compiles, its expert matmuls are megablox calls and its token
    exchange is `ragged_all_to_all` (4 per scanned body: there and back, and both again in the
    backward pass), with no padded `all-to-all` of token rows left."""
    devices = tpu_compile.tpu_topology_devices("v5e:2x2")
    recipe = load_recipe("moe_tiny", ["strategy.mesh=data:2,expert:2", "data.global_batch=8",
                                      "model.num_layers=2", "model.moe.layers=0,1"])
    text = lower_train_step(build_program(recipe, devices)).compile().as_text()
    kernels = [line.split("=")[0].strip() for line in text.splitlines()
               if f'custom_call_target="{TPU_CUSTOM_CALL}"' in line]
    # The scanned blocks share one body: 3 products x (gmm forward, gmm for d_lhs, tgmm for
    # d_rhs), beside splash attention's kernels.
    assert sum(k.startswith("%gmm") for k in kernels) == 6, kernels
    assert sum(k.startswith("%tgmm") for k in kernels) == 3, kernels
    lines = text.splitlines()
    # jax 0.10's libtpu leaves one op, jax 0.12's a start/done pair.
    ragged = [line for line in lines if " ragged-all-to-all(" in line
              or " ragged-all-to-all-start(" in line]
    assert len(ragged) == 4, ragged
    padded = [line for line in lines if " all-to-all(" in line and "s32[" not in line]
    assert not padded, padded
