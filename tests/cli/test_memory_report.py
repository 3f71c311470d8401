"""`mnemax show --compiled`: per-device params / grads / optimizer state / activations from the
compiled programs, beside the ZeRO formula (small model, 8 fake CPU devices)."""

import functools
import json

import pytest

from mnemax.trainer.memory_report import (
    compiled_gradient_memory,
    state_bytes,
    zero_formula_bytes,
)
from tests.helpers import SMALL

MESH = "strategy.mesh=data:2,fsdp:4"


@functools.cache
def _program(*overrides: str):
    from mnemax.recipes.registry import load_recipe
    from mnemax.trainer.setup import build_program

    return build_program(load_recipe("tiny", [*SMALL, MESH, *overrides]))


@functools.cache
def _gradient_memory(*overrides: str) -> dict:
    return compiled_gradient_memory(_program(*overrides))


@functools.lru_cache(maxsize=1)
def _show_json() -> dict:
    from mnemax.launch.cli import main

    args = ["show", "tiny", "--json", "--compiled", "--set", MESH,
            "--set", "strategy.zero_stage=2"]
    for item in SMALL:
        args += ["--set", item]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return json.loads(out.getvalue())


def test_formula_divides_by_tensor_and_moves_offloaded_state_to_host():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    assert zero_formula_bytes(1000, 0, mesh) == {
        "params_bytes": 2000.0, "grads_bytes": 2000.0, "opt_state_bytes": 4000.0,
        "host_opt_state_bytes": 0.0}
    # Stage 2: grads and moments over data x fsdp = 4, everything over tensor = 2.
    assert zero_formula_bytes(1000, 2, mesh) == {
        "params_bytes": 2000.0, "grads_bytes": 500.0, "opt_state_bytes": 1000.0,
        "host_opt_state_bytes": 0.0}
    # float8 moments (1 byte) over 4 devices, with 0.125 bytes of replicated scales per param.
    assert zero_formula_bytes(1000, 1, mesh, moment_bytes=1,
                              replicated_opt_bytes_per_param=0.125)["opt_state_bytes"] == 375.0
    # Stage 3: params over fsdp = 2, grads and bfloat16 moments over data x fsdp = 4, moments
    # in host memory.
    assert zero_formula_bytes(1000, 3, mesh, moment_bytes=2, offload_optimizer=True) == {
        "params_bytes": 1000.0, "grads_bytes": 500.0, "opt_state_bytes": 0.0,
        "host_opt_state_bytes": 500.0}


def test_show_json_reports_compiled_grads_activations_and_peak():
    out = _show_json()
    mem, formula = out["memory_per_device"], out["zero_formula_bytes"]
    for key in ("params_bytes", "grads_bytes", "opt_state_bytes", "activation_bytes",
                "host_opt_state_bytes", "step_peak_bytes", "host_activation_bytes"):
        assert key in mem, key
    assert mem["grads_from"] == "compiled gradient function"
    sharded = state_bytes(_program("strategy.zero_stage=2"))
    # 115,008 parameters: stage 2 splits the fp32 gradients 8 ways.
    assert out["params"] == 115_008
    assert mem["grads_bytes"] == pytest.approx(sharded["grads_bytes"], rel=0.05)
    assert mem["grads_bytes"] == pytest.approx(4 * 115_008 / 8, rel=0.05)
    assert mem["grads_bytes"] == pytest.approx(formula["grads_bytes"], rel=0.05)
    assert mem["host_opt_state_bytes"] == 0
    # The peak holds at least the state and the activations, and less than all temps at once.
    step = out["compiled_memory_per_device"]
    state = mem["params_bytes"] + mem["opt_state_bytes"]
    assert state + mem["activation_bytes"] < mem["step_peak_bytes"]
    assert mem["step_peak_bytes"] == (step["argument_bytes"] + step["temp_bytes"]
                                      + step["output_bytes"] - step["alias_bytes"])


@pytest.mark.parametrize("stage", [1, 3])
def test_compiled_gradient_bytes_match_shardings_and_formula(stage):
    program = _program(f"strategy.zero_stage={stage}")
    grads = _gradient_memory(f"strategy.zero_stage={stage}")["output_bytes"]
    formula = zero_formula_bytes(program.param_count, stage, dict(program.mesh.shape))
    assert grads == pytest.approx(state_bytes(program)["grads_bytes"], rel=0.05)
    assert grads == pytest.approx(formula["grads_bytes"], rel=0.05)
    # Stage 1 keeps whole gradients on each device; stage 3 splits them over data x fsdp = 8.
    assert grads == pytest.approx(4 * 115_008 / (1 if stage == 1 else 8), rel=0.05)


def test_full_remat_keeps_fewer_activations():
    none = _show_json()["memory_per_device"]["activation_bytes"]
    full = _gradient_memory("strategy.zero_stage=2", "strategy.remat=full")["temp_bytes"]
    assert full < 0.75 * none, (full, none)


def test_offloaded_optimizer_state_is_reported_as_host_bytes():
    sharded = state_bytes(_program("strategy.zero_stage=1", "strategy.offload_optimizer=true"))
    on_device = state_bytes(_program("strategy.zero_stage=1"))
    assert sharded["opt_state_bytes"] < 64  # only the step counters stay on the device
    assert sharded["host_opt_state_bytes"] == pytest.approx(
        on_device["opt_state_bytes"], abs=64)
    assert sharded["host_opt_state_bytes"] == pytest.approx(8 * 115_008 / 8, rel=0.05)

