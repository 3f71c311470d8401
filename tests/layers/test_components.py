"""The block-component protocol: a component registered from outside mnemax (here, from this
test) is picked up by the model, `mnemax show` (parameters, FLOPs, memory), the optimizer's
roles, the remat names and a 3-step train, with no other edit."""

import contextlib
import dataclasses
import io
import json
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from mnemax.errors import ConfigError
from mnemax.layers import axes
from mnemax.layers.components import BlockContext, Component, registered
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL

TOY_AXIS = "toy_hidden"
WIDTH = 24


class _ToyModule(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        w_in = self.param("w_in", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (axes.EMBED, TOY_AXIS)), (x.shape[-1], self.width))
        scale = self.param("gain", nn.with_logical_partitioning(
            nn.initializers.ones, (TOY_AXIS,)), (self.width,))
        w_out = self.param("w_out", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (TOY_AXIS, axes.EMBED)), (self.width, x.shape[-1]))
        h = checkpoint_name(jax.nn.relu(x @ w_in.astype(x.dtype)) * scale.astype(x.dtype),
                                "toy_hidden_act")
        return h @ w_out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ToyFFN(Component):
    """relu(x W_in) * gain @ W_out beside the dense FFN in every block."""

    kind: ClassVar[str] = "ffn"
    name: ClassVar[str] = "toy"
    module_name: ClassVar[str] = "toy"
    remat_names: ClassVar[tuple[str, ...]] = ("toy_hidden_act",)
    aux_keys: ClassVar[tuple[str, ...]] = ("toy/mean_abs",)
    # Its new axis is sharded like the MLP's hidden axis.
    axis_sharding: ClassVar[dict[str, str]] = {TOY_AXIS: axes.MLP}

    width: int = WIDTH

    @classmethod
    def for_block(cls, model, layer):
        return cls()

    def apply(self, ctx: BlockContext, x, positions, shared):
        out = _ToyModule(self.width, name=self.module_name)(x)
        return out, {"toy/mean_abs": jax.numpy.mean(jax.numpy.abs(out)).astype("float32")}

    def param_count(self, ctx):
        return 2 * ctx.model.d_model * self.width + self.width

    def flops_per_token(self, ctx, seq_len):
        return 6.0 * 2 * ctx.model.d_model * self.width


def _show(*overrides):
    from mnemax.launch.cli import main

    args = ["show", "tiny", "--json"]
    for item in (*SMALL, *overrides):
        args += ["--set", item]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return json.loads(out.getvalue())


def test_a_component_registered_outside_mnemax_is_picked_up_everywhere():
    base = _show("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")
    with registered(ToyFFN):
        toy = _show("strategy.mesh=data:2,fsdp:4", "strategy.zero_stage=3")
        recipe = load_recipe("tiny", [*SMALL, "strategy.mesh=data:2,fsdp:4",
                                      "strategy.zero_stage=3", "run.log_every=1",
                                      "strategy.remat=save_names:toy_hidden_act"])
        program = build_program(recipe)
        state = program.init(jax.random.key(0))
        params = jax.device_get(state.params)
        rng = np.random.default_rng(0)
        metrics = []
        for _ in range(3):
            batch = rng.integers(0, 257, (16, 33), dtype=np.int32)
            state, m = program.train_step(state, program.global_batch(batch))
            metrics.append(jax.device_get(m))
    layers, d = 2, 64
    extra = layers * (2 * d * WIDTH + WIDTH)
    assert toy["params"] == base["params"] + extra
    assert toy["flops_per_token"] == pytest.approx(base["flops_per_token"]
                                                   + layers * 12.0 * d * WIDTH)
    # The memory report counts the new parameters: fp32, params over fsdp = 4 and Adam's two
    # moments over data x fsdp = 8 (at ZeRO 3; WIDTH and d divide both). (Compiled activation
    # memory is left to tests/cli/test_memory_report.py: the step below compiles and runs it.)
    grew = {k: toy["memory_per_device"][k] - base["memory_per_device"][k]
            for k in ("params_bytes", "opt_state_bytes", "grads_bytes")}
    assert grew["params_bytes"] == pytest.approx(4 * extra / 4, abs=4 * layers * WIDTH)
    assert grew["opt_state_bytes"] == pytest.approx(8 * extra / 8, abs=8 * layers * WIDTH)
    # It trains: its parameters move, its aux metric is logged, its new axis is sharded like
    # the MLP axis (over nothing here), its matrices are decayed and its gain is not.
    block = params["layers"]["block"]["toy"]
    assert block["w_in"].shape == (layers, d, WIDTH)
    moved = jax.device_get(state.params)["layers"]["block"]["toy"]
    assert not np.allclose(moved["w_in"], block["w_in"])
    assert all(np.isfinite(m["loss"]) and m["toy/mean_abs"] > 0 for m in metrics)
    roles = program.roles["layers"]["block"]["toy"]
    assert roles == {"w_in": "matrix", "w_out": "matrix", "gain": "vector"}


def test_a_component_axis_nobody_shards_is_an_error():
    @dataclasses.dataclass(frozen=True)
    class Unmapped(ToyFFN):
        name: ClassVar[str] = "unmapped"
        axis_sharding: ClassVar[dict[str, str]] = {}

    with registered(Unmapped), pytest.raises(ConfigError, match=r"toy_hidden.*axis_sharding"):
        build_program(load_recipe("tiny", [*SMALL]))
