"""`mnemax plan`: memory sizes, the step-time model, candidates, and plans for the small model
on 8 devices (a budget that rules stage 0 out, and one nothing fits)."""

import contextlib
import io
import json

import pytest

from mnemax.errors import ConfigError
from mnemax.launch.plan import candidates, plan, require_fit
from mnemax.launch.plan_cost import (
    HARDWARE,
    ExpertTraffic,
    collective_seconds,
    parse_memory,
    recompute_factor,
    step_time,
)
from tests.helpers import SMALL


def _sets(*items):
    args = []
    for item in items:
        args += ["--set", item]
    return args


def _main(args):
    from mnemax.launch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("text, expected", [
    ("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("16G", 16 * 2**30), ("16g", 16 * 2**30),
    ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("2.3 MiB", int(2.3 * 2**20)),
    ("4096", 4096), ("100KB", 100_000), ("1T", 2**40),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80 gigs", "GB", "-1GB", "0GB", "80iB", ""])
def test_parse_memory_rejects_what_it_cannot_read(text):
    with pytest.raises(ConfigError, match="80GiB or 80G"):
        parse_memory(text)


def test_step_time_model_numbers():
    h100 = HARDWARE["h100"]
    # Stage 0 on 64 devices: a ring all-reduce of 4 GB of fp32 gradients across nodes.
    assert collective_seconds(10**9, 0, {"data": 64, "fsdp": 1}, 1, h100) == pytest.approx(
        2 * 4e9 * 63 / 64 / 50e9)
    # Stage 3 over 8-device fsdp groups inside a node (2 gathers + 1 reduce-scatter at 450
    # GB/s), then the 1/8 gradient shards all-reduced over data between nodes.
    hybrid = 3 * 4e9 * 7 / 8 / 450e9 + 2 * 0.5e9 * 7 / 8 / 50e9
    assert collective_seconds(10**9, 3, {"data": 8, "fsdp": 8}, 1, h100) == pytest.approx(hybrid)
    assert recompute_factor("full", 0.1) == pytest.approx(4 / 3)
    assert recompute_factor("none", 0.1) == 1.0
    t = step_time(flops_per_step=989e12, attention_share=0.0, params=10**9, stage=0,
                  remat="full", grad_accum=1, mesh={"data": 1, "fsdp": 1},
                  host_state_bytes=55e9, host_activation_bytes=0.0, hw=h100)
    # 1 s of peak FLOPs at 50% efficiency, x 4/3 for the recompute; 55 GB in and out at 55 GB/s.
    assert t.compute_s == pytest.approx(2 * 4 / 3)
    assert t.collective_s == 0.0
    assert t.host_s == pytest.approx(2.0)


def test_candidates_cover_stages_policies_offload_accum_and_meshes():
    cands = candidates(16, 8, 1, ("none", "full"))
    # Stages 0-2 on data:8 and stage 3 on fsdp 2, 4, 8; x 2 policies x offload x accum 1, 2.
    assert len(cands) == 3 * 2 * 2 * 2 + 3 * 2 * 2 * 2
    assert {c.grad_accum for c in cands} == {1, 2}
    assert {c.mesh for c in cands if c.zero_stage == 3} == {
        "data:4,fsdp:2", "data:2,fsdp:4", "data:1,fsdp:8"}
    assert {c.mesh for c in cands if c.zero_stage < 3} == {"data:8,fsdp:1"}


def test_expert_parallel_candidates_and_their_traffic():
    """MoE: the expert axis sizes join the meshes (data x fsdp x expert = the data-parallel
    devices), and the cost model moves the experts' gradients over data x fsdp only and adds
    the token all-to-alls, worked by hand."""
    meshes = {c.mesh for c in candidates(16, 8, 1, ("none",), (1, 2, 8))}
    assert {"data:8,fsdp:1", "data:4,fsdp:1,expert:2", "data:1,fsdp:1,expert:8",
            "data:2,fsdp:2,expert:2", "data:1,fsdp:4,expert:2"} <= meshes
    assert not any("expert:8" in m and "fsdp:1" not in m for m in meshes)  # no fsdp left
    h100 = HARDWARE["h100"]
    moe = ExpertTraffic(expert_params=6 * 10**8, moe_layers=16, tokens_per_device=8192,
                        topk=2, d_model=2048, value_bytes=2, ragged=True)
    mesh = {"data": 4, "fsdp": 1, "expert": 2}
    # Stage 0 inside one node (450 GB/s): 0.4 B dense parameters all-reduced over all 8
    # devices, the 0.6 B expert parameters split in 2 and all-reduced over data:4; then
    # 16 MoE blocks x 4 exchanges (no remat) of 8192 x 2 rows x 2048 bf16 values, half of
    # them off the device.
    dense = 2 * 4 * 0.4e9 * 7 / 8 / 450e9
    routed = 2 * 4 * 0.3e9 * 3 / 4 / 450e9
    exchange = 16 * 4 * (8192 * 2 * 2048 * 2) * 1 / 2 / 450e9
    assert collective_seconds(10**9, 0, mesh, 1, h100, moe) == pytest.approx(
        dense + routed + exchange)
    # Padded blocks move n = 2 times the rows; a rerun forward (remat) adds 2 exchanges.
    padded = ExpertTraffic(**{**moe.__dict__, "ragged": False})
    assert collective_seconds(10**9, 0, mesh, 1, h100, padded, "full") == pytest.approx(
        dense + routed + exchange * 2 * 6 / 4)
    # No expert axis: the MoE is plain data parallel.
    assert collective_seconds(10**9, 0, {"data": 8, "fsdp": 1}, 1, h100, moe) == pytest.approx(
        2 * 4e9 * 7 / 8 / 450e9)


def test_plan_picks_a_compiled_fit_when_the_budget_rules_out_stage_0():
    # Stage 0 replicates everything: its compiled peak is 3.07 MiB here (estimate 2.71 MiB);
    # stage 2 with no remat compiles to 2.06 MiB. Candidates must fit in 90% of the budget
    # (GPU_MEMORY_MARGIN): 2.25 MiB.
    budget = "2.5MiB"
    code, out, _ = _main(["plan", "tiny", "--devices", "8", "--memory-per-device", budget,
                          "--json", *_sets(*SMALL)])
    assert code == 0
    result = json.loads(out)
    best = result["best"]
    assert best is not None and best["fits"] and best["chosen"]
    assert best["zero_stage"] != 0
    assert best["peak_bytes"] is not None
    assert best["peak_bytes"] <= 0.9 * parse_memory(budget) == result["usable_bytes"]
    stage0 = [r for r in result["candidates"] if r["zero_stage"] == 0 and r["remat"] == "none"
              and r["grad_accum"] == 1 and not r["offload_optimizer"]]
    assert stage0[0]["fits"] is False and "budget" in stage0[0]["status"]
    assert len(result["candidates"]) == 96  # 4 remat policies, offload_names included


def test_impossible_budget_is_a_clear_error():
    from mnemax.launch.plan_cost import hardware

    result = plan("tiny", list(SMALL), devices=8, budget=parse_memory("64KiB"),
                  hw=hardware("h100"), in_process=True)
    assert result.best is None
    assert all(r["fits"] is False for r in result.rows)
    with pytest.raises(ConfigError, match=r"nothing fits in 57\.60 KiB \(64\.00 KiB less a 10% "
                       r"margin\) per device on 8 devices"):
        require_fit(result)
    code, _, err = _main(["plan", "tiny", "--devices", "8", "--memory-per-device", "64KiB",
                          *_sets(*SMALL)])
    assert code == 2
    assert "error: nothing fits" in err and "--memory-per-device" in err


def test_bad_plan_inputs_name_the_fix():
    code, _, err = _main(["plan", "tiny", "--devices", "3", "--memory-per-device", "1GB",
                          *_sets(*SMALL)])
    assert code == 2 and "does not split over the 3 data-parallel devices" in err
    code, _, err = _main(["plan", "tiny", "--devices", "8", "--memory-per-device", "lots"])
    assert code == 2 and "memory size 'lots' is not understood" in err
    code, _, err = _main(["plan", "tiny", "--devices", "8", "--device-kind", "tpu9"])
    assert code == 2 and "--device-kind 'tpu9' is unknown" in err
    code, _, err = _main(["plan", "tiny", "--topology", "v5e:2x2", "--devices", "4"])
    assert code == 2 and "drop --devices" in err
    code, _, err = _main(["plan", "tiny"])
    assert code == 2 and "--devices N" in err and "--topology NAME" in err
    code, _, err = _main(["plan", "moe_tiny", "--devices", "8", *_sets("strategy.mesh=expert:3")])
    assert code == 2 and "keeps the expert size" in err and "expert:N" in err


def _fewer_candidates(monkeypatch):
    """The search over stages 0 and 3 without offload or accumulation: every remat policy and
    both measurement paths, a sixth of the candidates to measure (the full grid is
    test_plan_picks_a_compiled_fit_when_the_budget_rules_out_stage_0's)."""
    from mnemax.launch import plan as plan_module

    every = plan_module.candidates
    monkeypatch.setattr(plan_module, "candidates", lambda *args, **kwargs: [
        c for c in every(*args, **kwargs)
        if c.zero_stage in (0, 3) and not c.offload_optimizer and c.grad_accum == 1])


def test_tpu_plan_ranks_real_tpu_compiles_by_the_compilers_estimate(monkeypatch):
    from mnemax.launch import plan as plan_module
    from mnemax.launch.compile import tpu_hardware, tpu_topology_devices

    # Two finalists (the default is 3) keep the test to two TPU compiles; the ranking among
    # them is the same code.
    monkeypatch.setattr(plan_module, "TPU_FINALISTS", 2)
    _fewer_candidates(monkeypatch)
    chips = tpu_topology_devices("v5e:2x2")
    hw = tpu_hardware(chips[0])
    result = plan("tiny", list(SMALL), devices=len(chips), budget=hw.memory_bytes, hw=hw,
                  in_process=True, topology="v5e:2x2", cache=False)
    compiled = [r for r in result.rows if r.get("compiled_step_s") is not None]
    # The fastest candidates by the model all fit a v5e's 16 GiB: exactly the finalists are
    # compiled for the TPU, and the chosen one has the lowest compiler estimate among them.
    assert len(compiled) == plan_module.TPU_FINALISTS
    assert all(r["fits"] and r["peak_bytes"] <= 0.95 * hw.memory_bytes for r in compiled)
    assert result.best is min(compiled, key=lambda r: r["compiled_step_s"])
    assert result.to_json()["topology"] == "v5e:2x2"


def test_measurement_failures_are_classified():
    import jax

    from mnemax.launch.plan_worker import failure_answer

    assert failure_answer(jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))["kind"] == "oom"
    assert failure_answer(jax.errors.JaxRuntimeError("INTERNAL: ptxas failed"))["kind"] == (
        "compile")
    try:
        raise TypeError("unsupported operand")
    except TypeError as err:
        answer = failure_answer(err)
    assert answer["kind"] == "error" and "TypeError: unsupported operand" in answer["error"]
    assert "Traceback" in answer["traceback"]


def test_a_planner_defect_is_an_error_not_a_candidate_that_does_not_fit(monkeypatch):
    from mnemax.launch.plan import PlannerFailure
    from mnemax.launch.plan_cost import hardware
    from mnemax.launch.plan_worker import Measurer

    def broken(self, extra, rows):
        raise TypeError("a bug in the residual trace")

    monkeypatch.setattr(Measurer, "residuals", broken)
    with pytest.raises(PlannerFailure, match="TypeError: a bug in the residual trace"):
        plan("tiny", list(SMALL), devices=8, budget=parse_memory("1GB"), hw=hardware("h100"),
             in_process=True, cache=False)


def test_residuals_that_cannot_be_traced_never_count_as_zero_bytes(monkeypatch):
    """A candidate whose residual trace fails is reported as failing, not estimated with no
    activations (which ranked it as fitting)."""
    from mnemax.errors import ConfigError as Refused
    from mnemax.launch.plan_cost import hardware
    from mnemax.launch.plan_worker import Measurer

    traced = Measurer.residuals

    def refuse_full(self, extra, rows):
        if "strategy.remat=full" in extra:
            raise Refused("cannot trace this one")
        return traced(self, extra, rows)

    monkeypatch.setattr(Measurer, "residuals", refuse_full)
    _fewer_candidates(monkeypatch)
    result = plan("tiny", list(SMALL), devices=8, budget=parse_memory("1GB"),
                  hw=hardware("h100"), in_process=True, cache=False)
    full = [r for r in result.rows if r["remat"] == "full"]
    assert full and all(r["fits"] is False and r["est_peak_bytes"] is None
                        and "cannot trace this one" in r["status"] for r in full)
    assert result.best is not None and result.best["remat"] != "full"
