"""`mnemax plan`: the fastest parallel configuration of a recipe that fits a memory budget.

Candidates: ZeRO stages 0-3 x remat policies (none, full, dots_saveable, and offload_names of
every intermediate the model tags with `checkpoint_name`) x optimizer offload off/on x
gradient accumulation 1, 2, 4, ... (while the micro-batch still splits over the data-parallel
devices) x data/fsdp splits of the devices (fsdp only matters at stage 3: below it every split
behaves as data:N; a `tensor` size given with `--set strategy.mesh=...` is kept) x, for a
mixture of experts, the `expert` axis sizes (powers of two dividing the data-parallel devices
and the experts, or the one `strategy.mesh` gives), the cost model counting the token
all-to-alls and the experts' own gradient traffic (`plan_cost.collective_seconds`).

Search, cheapest evidence first (`plan_worker` does the JAX work, in a subprocess on fake CPU
devices): 1. the exact state bytes per device from each candidate's shardings (no compile);
2. an estimate of the peak (state + gradients + the backward pass's residuals, traced per
device) and of the step time (`plan_cost`); 3. in order of estimated step time, compile the
candidates whose estimate is within `PRUNE_MARGIN` of the budget until one fits. Results are
cached on disk (`$MNEMAX_CACHE/plan`) per recipe, candidate and code version.

A candidate fits when its compiled peak is within the budget less the hardware's stated margin
(`plan_cost.GPU_MEMORY_MARGIN`, `TPU_MEMORY_MARGIN`). For a TPU slice (`topology`), step 3
uses the real TPU compiler on libtpu's compile-only topology instead of the CPU stand-in
(`mnemax.launch.compile`): the `TPU_FINALISTS` fastest candidates by the model that pass the
estimate are compiled, and among those that fit the compiler's own step estimate decides.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnemax.errors import ConfigError
from mnemax.launch.plan_cost import ExpertTraffic, Hardware, StepTime, format_bytes, step_time
from mnemax.launch.plan_worker import InProcessWorker, MeasurementCache, SubprocessWorker

REMAT_POLICIES = ("none", "full", "dots_saveable")
# Compile a candidate whose estimated peak is under budget / PRUNE_MARGIN (the estimate leaves
# out XLA's workspace but adds gradients and residuals that are not all live at once).
PRUNE_MARGIN = 0.9
# TPU: candidates compiled for real (each is two compiles: the step, and its loop-free twin for
# the estimate) before the compiler's step estimate picks among those that fit.
TPU_FINALISTS = 3


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration the planner tries."""

    zero_stage: int
    remat: str
    offload_optimizer: bool
    grad_accum: int
    mesh: str  # e.g. "data:4,fsdp:2"

    def overrides(self) -> list[str]:
        """The `--set` items that select this configuration."""
        return [f"strategy.zero_stage={self.zero_stage}", f"strategy.remat={self.remat}",
                f"strategy.offload_optimizer={str(self.offload_optimizer).lower()}",
                f"run.grad_accum={self.grad_accum}", f"strategy.mesh={self.mesh}"]

    def mesh_shape(self) -> dict[str, int]:
        return {name: int(size) for name, size in
                (part.split(":") for part in self.mesh.split(","))}


def _mesh(data: int, fsdp: int, tensor: int, expert: int = 1) -> str:
    parts = [f"data:{data}", f"fsdp:{fsdp}"] + ([f"tensor:{tensor}"] if tensor > 1 else []) + (
        [f"expert:{expert}"] if expert > 1 else [])
    return ",".join(parts)


def candidates(global_batch: int, devices: int, tensor: int, remat_policies: tuple[str, ...],
               expert_sizes: tuple[int, ...] = (1,)) -> list[Candidate]:
    """Every configuration to try (see the module docstring). `expert_sizes`: sizes of the
    `expert` axis to try (a mixture of experts' expert parallelism); the expert axis splits the
    batch too, so the data-parallel devices are data x fsdp x expert."""
    dp = devices // tensor
    accums = [k for k in (2**i for i in range(int(math.log2(global_batch)) + 1))
              if global_batch % k == 0 and (global_batch // k) % dp == 0]
    out = []
    for expert in expert_sizes:
        rest = dp // expert
        for stage in range(4):
            # fsdp = 1 at stage 3 would shard nothing; below stage 3 fsdp acts as data.
            splits = ([(rest // f, f) for f in range(2, rest + 1) if rest % f == 0]
                      if stage == 3 else [(rest, 1)])
            for (data, fsdp) in splits:
                for remat in remat_policies:
                    for offload in (False, True):
                        for accum in accums:
                            out.append(Candidate(stage, remat, offload, accum,
                                                 _mesh(data, fsdp, tensor, expert)))
    return out


@dataclasses.dataclass
class PlanResult:
    """Every candidate with its figures and verdict, and the chosen one (None: nothing fits)."""

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    budget_bytes: int
    devices: int
    hardware: Hardware
    notes: list[str]
    topology: str | None = None

    @property
    def usable_bytes(self) -> int:
        """The budget less the hardware's margin: what a compiled peak must stay under."""
        return int(self.budget_bytes * (1.0 - self.hardware.memory_margin))

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best, "candidates": self.rows, "budget_bytes": self.budget_bytes,
                "usable_bytes": self.usable_bytes, "devices": self.devices,
                "device_kind": self.hardware.kind, "topology": self.topology,
                "hardware": dataclasses.asdict(self.hardware), "notes": self.notes}


class Planner:
    """Runs the search of the module docstring for one recipe."""

    def __init__(self, recipe_arg: str, overrides: list[str], devices: int, budget: int,
                 hw: Hardware, *, in_process: bool = False, cache_dir: Path | None = None,
                 log: Callable[[str], None] = lambda _msg: None,
                 topology: str | None = None) -> None:
        from mnemax.parallel.strategy import parse_mesh
        from mnemax.recipes.registry import load_recipe

        self.recipe_arg, self.overrides = recipe_arg, list(overrides)
        self.recipe = load_recipe(recipe_arg, self.overrides)
        self.devices, self.budget, self.hw, self.log = devices, budget, hw, log
        self.topology = topology
        self.usable = int(budget * (1.0 - hw.memory_margin))
        self.in_process = in_process
        self.cache = MeasurementCache(cache_dir)
        self._worker: Any = None
        self._memo: dict[str, dict[str, Any]] = {}
        if devices < 1:
            raise ConfigError(f"--devices {devices}: give the number of devices to plan for "
                              "(at least 1)")
        self.tensor = parse_mesh(self.recipe.strategy.mesh).get("tensor", 1)
        if self.tensor == -1 or devices % self.tensor:
            raise ConfigError(
                f"strategy.mesh={self.recipe.strategy.mesh!r}: the planner keeps the tensor "
                f"size, which must be a positive number dividing --devices {devices}; set "
                "strategy.mesh=tensor:T with T dividing the device count (or leave tensor out)")
        batch, dp = self.recipe.data.global_batch, devices // self.tensor
        if batch % dp:
            raise ConfigError(
                f"data.global_batch={batch} does not split over the {dp} data-parallel devices "
                f"(--devices {devices}" + (f" / tensor {self.tensor}" if self.tensor > 1 else "")
                + f"); use a global batch that is a multiple of {dp} (--set data.global_batch="
                f"{dp * max(1, round(batch / dp))}) or a --devices that divides {batch}")
        self.expert_sizes = self._expert_sizes(parse_mesh(self.recipe.strategy.mesh), dp)

    def _expert_sizes(self, mesh: dict[str, int], dp: int) -> tuple[int, ...]:
        """The `expert` axis sizes to try: the one `strategy.mesh` gives, else (a mixture of
        experts) every power of two dividing both the data-parallel devices and the experts,
        else none."""
        moe = getattr(self.recipe.model, "moe", None)
        given = mesh.get("expert", 1)
        if given != 1:
            if given == -1 or dp % given or moe is None or moe.num_experts % given:
                raise ConfigError(
                    f"strategy.mesh={self.recipe.strategy.mesh!r}: the planner keeps the expert "
                    f"size, which must divide the {dp} data-parallel devices and the model's "
                    "experts; give strategy.mesh=expert:N with such an N (or leave expert out "
                    "and the planner tries each)")
            return (given,)
        if moe is None:
            return (1,)
        return tuple(e for e in (2**i for i in range(int(math.log2(dp)) + 1))
                     if dp % e == 0 and moe.num_experts % e == 0)

    def _expert_traffic(self, cand: Candidate) -> ExpertTraffic | None:
        """The MoE's share of the collectives of `cand` (None: no experts split)."""
        moe = getattr(self.recipe.model, "moe", None)
        if moe is None or cand.mesh_shape().get("expert", 1) == 1:
            return None
        import numpy as np

        from mnemax.trainer.setup import COMPUTE_DTYPES

        model, data = self.recipe.model, self.recipe.data
        layers = len(moe.layers)
        per_layer = moe.num_experts * 3 * model.d_model * moe.expert_dim
        tokens = data.global_batch * data.seq_len // (self.devices // self.tensor)
        return ExpertTraffic(
            expert_params=layers * per_layer, moe_layers=layers, tokens_per_device=tokens,
            topk=moe.topk, d_model=model.d_model,
            value_bytes=np.dtype(COMPUTE_DTYPES[self.recipe.run.compute_dtype]).itemsize,
            ragged=self.hw.platform == "tpu")

    # -- measurements (cached) --------------------------------------------------------------

    def _ask(self, request: dict[str, Any], label: str = "") -> dict[str, Any]:
        from mnemax.recipes.registry import load_recipe
        from mnemax.trainer.recipe import recipe_to_dict

        memo_key = json.dumps(request, sort_keys=True)
        if memo_key in self._memo:
            return self._memo[memo_key]
        recipe = load_recipe(self.recipe_arg, [*self.overrides, *request["overrides"]])
        recipe_json = json.dumps(recipe_to_dict(recipe), sort_keys=True, default=str)
        answer = self.cache.get(request, recipe_json, self.devices)
        if answer is None:
            if label:
                self.log(label)
            if self._worker is None:
                kind = InProcessWorker if self.in_process else SubprocessWorker
                self._worker = kind(self.recipe_arg, self.overrides, self.devices)
            answer = self._worker.ask(request)
            if answer.get("kind") == "error":
                raise PlannerFailure(request, answer)
            self.cache.put(request, recipe_json, self.devices, answer)
        self._memo[memo_key] = answer
        return answer

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # -- the search ---------------------------------------------------------------------------

    def run(self) -> PlanResult:
        """Measures, ranks and compiles candidates; returns every row and the chosen one."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> PlanResult:
        data = self.recipe.data
        dp = self.devices // self.tensor
        first = candidates(data.global_batch, self.devices, self.tensor, ("none",),
                           self.expert_sizes[:1])[0]
        probe = self._ask({"op": "residuals", "overrides": first.overrides(),
                           "rows": max(1, data.global_batch // dp)})
        if "error" in probe:
            raise ConfigError(f"{self.recipe.name} does not build with "
                              f"{' '.join(first.overrides())}: {probe['error']}")
        policies = REMAT_POLICIES
        margin = (f"; a candidate fits in {format_bytes(self.usable)} = the budget less "
                  f"{self.hw.memory_margin:.0%} (what that peak does not see)")
        if self.topology:
            notes = [f"memory and the final ranking: the TPU compiler for {self.topology} "
                     f"(libtpu compile-only), its {TPU_FINALISTS} fastest candidates by the "
                     "model below ranked by the compiler's step estimate" + margin]
        else:
            notes = ["memory: XLA:CPU's memory analysis of the train step compiled for "
                     f"{self.devices} fake CPU devices stands in for {self.hw.kind} (an "
                     "estimate)" + margin]
        if probe["names"]:
            policies += ("offload_names:" + ",".join(probe["names"]),)
            notes.append(f"offload_names = {', '.join(probe['names'])} (the intermediates the "
                         "model tags); their residuals go to pinned host memory" + (
                             ", which the TPU compiler counts apart" if self.topology else
                             ", which XLA:CPU does not model: they are taken off the compiled "
                             "peak"))
        else:
            notes.append("no offload_names policy: the model tags no intermediates")
        rows = [self._row(c) for c in candidates(data.global_batch, self.devices, self.tensor,
                                                policies, self.expert_sizes)]
        best = self._search(rows)
        return PlanResult(rows, best, self.budget, self.devices, self.hw, notes, self.topology)

    def _row(self, cand: Candidate) -> dict[str, Any]:
        row = {**dataclasses.asdict(cand), "fits": None, "peak_bytes": None,
               "est_peak_bytes": None, "host_bytes": None, "est_step_s": None,
               "chosen": False, "status": ""}
        state = self._ask({"op": "state", "overrides": cand.overrides()})
        if "error" in state:
            row.update(fits=False, status=f"fails to build: {state['error']}")
            return row
        resident = state["params_bytes"] + state["opt_state_bytes"] + state["grads_bytes"]
        row["host_bytes"] = state["host_params_bytes"] + state["host_opt_state_bytes"]
        if resident > self.usable:
            row.update(fits=False, est_peak_bytes=resident,
                       status=f"params + grads + optimizer state alone "
                              f"{format_bytes(resident)} > budget")
            return row
        try:
            kept, offloaded = self._residuals(cand)
        except ResidualsUnavailable as err:
            row.update(fits=False, status=f"fails to build: {err}")
            return row
        data = self.recipe.data
        batch = data.global_batch * (data.seq_len + 1) * 4 // (self.devices // self.tensor)
        row["est_peak_bytes"] = resident + kept + batch
        row["host_bytes"] += offloaded
        row["host_activation_bytes"] = offloaded
        flops = self.recipe.model.flops_per_token(data.seq_len) * data.global_batch * data.seq_len
        share = 1.0 - self.recipe.model.flops_per_token(1) / self.recipe.model.flops_per_token(
            data.seq_len)
        time: StepTime = step_time(
            flops_per_step=flops, attention_share=share, params=state["params"],
            stage=cand.zero_stage, remat=cand.remat, grad_accum=cand.grad_accum,
            mesh=cand.mesh_shape(), host_state_bytes=state["host_opt_state_bytes"],
            host_activation_bytes=offloaded, hw=self.hw, experts=self._expert_traffic(cand))
        row.update(est_step_s=time.total_s, compute_s=time.compute_s,
                   collective_s=time.collective_s, host_s=time.host_s)
        return row

    def _residuals(self, cand: Candidate) -> tuple[int, int]:
        """(residual bytes one device keeps, bytes it offloads to the host) per micro-batch."""
        rows = self.recipe.data.global_batch // cand.grad_accum // (self.devices // self.tensor)

        def traced(remat: str) -> dict[str, Any]:
            # Traced on data x expert: the exchange's buffers depend on the expert size.
            expert = cand.mesh_shape().get("expert", 1)
            base = dataclasses.replace(cand, zero_stage=0, offload_optimizer=False, remat=remat,
                                       mesh=_mesh(self.devices // self.tensor // expert, 1,
                                                  self.tensor, expert))
            answer = self._ask({"op": "residuals", "overrides": base.overrides(),
                                "rows": rows})
            if "error" in answer:  # never counted as zero bytes
                raise ResidualsUnavailable(f"tracing the residuals with "
                                           f"{' '.join(base.overrides())}: {answer['error']}")
            return answer

        # The compute-dtype copy of the parameters is split as the parameters are (by the
        # ZeRO layout): the candidate's share of the whole parameters.
        state = self._ask({"op": "state", "overrides": cand.overrides()})
        share = state["params_bytes"] / state["params_whole_bytes"]
        own = traced(cand.remat)
        kept = own["activation_bytes"] // self.tensor + int(own["cast_bytes"] * share)
        if not cand.remat.startswith("offload_names"):
            return kept, 0
        full = traced("full")
        on_device = full["activation_bytes"] // self.tensor + int(full["cast_bytes"] * share)
        return on_device, max(kept - on_device, 0)

    def _search(self, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        ranked = sorted((r for r in rows if r["est_step_s"] is not None),
                        key=lambda r: (round(math.log(r["est_step_s"]) / math.log(1.001)),
                                       r["grad_accum"], r["est_peak_bytes"]))
        # GPU: the first that fits by the model's order. TPU: the fastest by the compiler's
        # estimate among the first TPU_FINALISTS that fit.
        wanted = TPU_FINALISTS if self.topology else 1
        fitting: list[dict[str, Any]] = []
        # compiled / estimated peak, lowest seen so far: the estimate leaves XLA's workspace
        # out, so once compiles show how much it adds, prune with that (conservatively).
        ratios: list[float] = []
        for count, row in enumerate(ranked, 1):
            ratio = min(ratios, default=1.0)
            if row["est_peak_bytes"] * ratio * PRUNE_MARGIN > self.usable:
                estimate = format_bytes(row["est_peak_bytes"])
                row.update(fits=False,
                           status=f"estimated peak {estimate} > budget (not compiled)")
                continue
            if len(fitting) >= wanted:
                row["status"] = "not compiled: ranked after the chosen one"
                continue
            cand = Candidate(**{f.name: row[f.name] for f in dataclasses.fields(Candidate)})
            request: dict[str, Any] = {"op": "compile", "overrides": cand.overrides()}
            if self.topology:
                request = {**request, "op": "tpu_compile", "topology": self.topology}
            compiled = self._ask(request, label=f"compiling candidate {count}/{len(ranked)}: "
                                                f"{' '.join(cand.overrides())}")
            if "error" in compiled:
                row.update(fits=False, status=f"fails to compile: {compiled['error']}")
                continue
            peak = compiled["peak_bytes"]
            if compiled.get("platform") == "cpu":
                peak -= row.get("host_activation_bytes", 0)
            row["peak_bytes"] = peak
            if "compiled_step_s" in compiled:
                row["compiled_step_s"] = compiled["compiled_step_s"]
            ratios.append(peak / max(row["est_peak_bytes"], 1))
            if peak <= self.usable:
                row.update(fits=True, status="fits")
                fitting.append(row)
            else:
                row.update(fits=False, status=f"compiled peak {format_bytes(peak)} > budget")
        if not fitting:
            return None
        best = min(fitting, key=lambda r: r.get("compiled_step_s", 0.0)) if self.topology \
            else fitting[0]
        by = "compiler's step estimate" if self.topology else "estimate"
        best.update(chosen=True, status=f"fits: chosen (fastest {by})")
        return best


class ResidualsUnavailable(Exception):
    """The backward pass's residuals of a candidate could not be traced."""


class PlannerFailure(RuntimeError):
    """A measurement failed for a reason other than the configuration not building, compiling
    or fitting: a defect, reported with the worker's traceback rather than as "does not fit"."""

    def __init__(self, request: dict[str, Any], answer: dict[str, Any]) -> None:
        super().__init__(f"planner measurement {request['op']} with "
                         f"{' '.join(request['overrides'])} failed: {answer['error']}\n"
                         f"{answer.get('traceback', '')}")


def plan(recipe: str, overrides: list[str], *, devices: int, budget: int, hw: Hardware,
         in_process: bool = False, cache: bool = True,
         log: Callable[[str], None] = lambda _msg: None,
         topology: str | None = None) -> PlanResult:
    """The fastest configuration of `recipe` that fits `budget` bytes per device on `devices`
    devices of kind `hw` (see the module docstring), or on the chips of TPU `topology`;
    `result.best` is None if nothing fits."""
    from mnemax.trainer.data.corpus import cache_root

    directory = cache_root() / "plan" if cache else None
    planner = Planner(recipe, overrides, devices, budget, hw, in_process=in_process,
                      cache_dir=directory, log=log, topology=topology)
    try:
        return planner.run()
    finally:
        planner.close()


def require_fit(result: PlanResult) -> dict[str, Any]:
    """The chosen row, or a ConfigError saying how close the best candidate came and what to
    change."""
    if result.best is not None:
        return result.best
    measured = [r for r in result.rows if r["peak_bytes"] or r["est_peak_bytes"]]
    if not measured:
        raise ConfigError("no configuration could be built; see the table for each error")
    smallest = min(measured, key=lambda r: r["peak_bytes"] or r["est_peak_bytes"])
    need = smallest["peak_bytes"] or smallest["est_peak_bytes"]
    margin = result.hardware.memory_margin
    where = (f"on {result.topology}" if result.topology
             else f"per device on {result.devices} devices")
    fix = ("use a larger TPU --topology" if result.topology else
           f"raise --memory-per-device to at least {format_bytes(need / (1.0 - margin))}, plan "
           "for more --devices")
    raise ConfigError(
        f"nothing fits in {format_bytes(result.usable_bytes)} ({format_bytes(result.budget_bytes)}"
        f" less a {margin:.0%} margin) {where}: the smallest peak is {format_bytes(need)} "
        f"(stage {smallest['zero_stage']}, remat {smallest['remat'].partition(':')[0]}, mesh "
        f"{smallest['mesh']}, grad_accum {smallest['grad_accum']}). {fix[0].upper()}{fix[1:]}, "
        "or shrink the model or data.global_batch / data.seq_len"
    )
