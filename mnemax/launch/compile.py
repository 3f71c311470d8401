"""`mnemax compile`: a recipe's init and train step compiled for a TPU topology, on any machine.

libtpu's compile-only topologies (`jax.experimental.topologies`) give devices of a real TPU
slice with no TPU present, as MaxText's `train_compile` uses them. The recipe's program is built
on those devices with the same mesh, shardings and donation as a run (`build_program`), lowered
from abstract inputs and compiled by the real TPU compiler. Reported per chip:

- XLA's memory analysis of the train step: arguments, temp, outputs, aliased (donated state) and
  peak = arguments + temp + outputs - aliased (MaxText's `train_compile` figure), against the
  chip's HBM. The compiler's own heap simulation (`peak_memory_in_bytes`, `xla_peak_bytes`)
  is reported beside it: it is lower, as it knows which temporaries are live together, and on a
  scanned model the sum also counts the scan's stacked layer inputs twice (benchmarks/RESULTS.md,
  TPU section). Whether the step (and the init program) fits is judged by the heap simulation
  where this jax reports it, since libtpu's own compile-time HBM check uses it: a program whose
  sum exceeds the HBM by a third compiles, and the compiler refuses one whose heap simulation
  exceeds it by 0.1%. Elsewhere (jax 0.10) by the sum;
- FLOPs and the compiler's step estimate (`cost_analysis()["optimal_seconds"]`). XLA's cost
  analysis counts a while loop's body once, so a scanned model (`model.scan_layers`) or a
  micro-batch loop (`run.grad_accum` > 1) is undercounted by its trip count. Both figures are
  therefore taken from a loop-free twin of the step: the layers unrolled and the whole batch in
  one pass (the same work; what the loop itself costs per iteration is not in it). On slices
  where the TPU compiler turns an all-gather or reduce-scatter next to a matmul into a loop of
  its own (windowed einsum, "collective matmul": `windowed_dot_general_body` loops, e.g. on
  v5p:2x2x2), the twin is compiled with those off (`TWIN_COMPILER_OPTIONS`), so its FLOPs are
  all counted; its estimate then does not overlap that communication with the matmuls (an
  upper bound there). The ops' own XLA loops (Gated DeltaNet's scan over chunks, the
  block-sparse gathered path's steps) are traced unrolled in the twin
  (`dispatch.unrolled_loops`). Loops the twin still has are counted once and reported in
  `loops_counted_once`; custom calls (Pallas kernels) are not in XLA's
  estimate at all. The real step's own (undercounted) figures are reported beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from mnemax.errors import MnemaxError
from mnemax.launch.plan_cost import TPU_HARDWARE, Hardware
from mnemax.layers.kernels import dispatch
from mnemax.trainer.memory_report import lower_train_step, memory_stats, step_peak_bytes

GIB = 2**30
TOPOLOGY_FORMS = ("GENERATION:SHAPE with SHAPE = AxB (v5e, v6e) or AxBxC (v4, v5p), e.g. "
                  "v5e:2x2, v5e:4x4, v6e:2x2, v5p:2x2x1, v5p:2x2x2, v4:2x2x1")
_TOPOLOGY = re.compile(r"^[A-Za-z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?$")
_WHILE = re.compile(r"\swhile\(")


class CompileError(MnemaxError):
    """The TPU compile cannot start (no libtpu, unknown topology) or its step does not fit."""


def libtpu_available() -> bool:
    """Whether libtpu (the TPU compiler) is installed for this JAX."""
    from jax._src import cloud_tpu_init  # the one place mnemax asks JAX where libtpu is

    return cloud_tpu_init.get_tpu_library_path() is not None


def quiet_compile_only_libtpu() -> None:
    """Environment for libtpu on a machine without TPU chips, set before libtpu first loads.

    Without it libtpu looks for the TPU VM's metadata and logs a paragraph of INVALID_ARGUMENT
    errors about worker hostnames and the accelerator type; a compile-only topology needs
    neither (its chips come from the topology name: checked for v4, v5e, v5p and v6e names with
    this accelerator type set). The lock file that makes a second libtpu process abort guards a
    real TPU, which compile-only use never opens. A TPU VM's own settings are left alone.
    """
    from mnemax.launch.platforms import visible_accelerators

    if visible_accelerators()[0]:
        return
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", "v5p-8"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(name, value)


def tpu_topology_devices(name: str) -> list[jax.Device]:
    """The devices of TPU topology `name` (e.g. "v5p:2x2x2"), compile-only: nothing runs.

    Raises CompileError naming the fix when libtpu is missing or the name is not a topology.
    """
    if not libtpu_available():
        raise CompileError(
            f"compiling for TPU needs libtpu, which is not installed for jax {jax.__version__}; "
            f"install it with: pip install 'jax[tpu]=={jax.__version__}' (the dev install, "
            "pip install -e '.[dev]', brings it)")
    if not _TOPOLOGY.match(name):
        raise CompileError(f"--topology {name!r} is not a TPU topology name; write "
                           f"{TOPOLOGY_FORMS}")
    quiet_compile_only_libtpu()
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as err:  # libtpu's own message is a long INVALID_ARGUMENT paragraph
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CompileError(f"--topology {name!r} is not a TPU topology libtpu knows ({first}); "
                           f"write {TOPOLOGY_FORMS}") from None


def tpu_hardware(device: jax.Device) -> Hardware:
    """The planner's figures (HBM, ICI, peak FLOP/s) for `device`'s chip; CompileError for a
    kind not in `TPU_HARDWARE`. HBM from Cloud TPU's system-architecture pages (their "GB" are
    GiB: a v5e reports a 16 GiB `bytes_limit`)."""
    kind = device.device_kind
    if kind not in TPU_HARDWARE:
        raise CompileError(f"no figures known for TPU device kind {kind!r}; known kinds: "
                           f"{', '.join(TPU_HARDWARE)}")
    return TPU_HARDWARE[kind]


def _memory(compiled: Any) -> dict[str, int]:
    """`memory_stats` of the compiled program, its peak (arguments + temp + outputs - aliased;
    TPU reports host-placed state apart, so none is taken off) and `xla_peak_bytes`: the TPU
    compiler's own heap simulation (arguments included), lower than the sum as it sees which
    temporaries are live at once; -1 where this jax does not report it."""
    out = memory_stats(compiled)
    out["peak_bytes"] = step_peak_bytes(out, host_state_bytes=0)
    stats = compiled.memory_analysis()
    out["xla_peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", -1) or -1)
    return out


def _cost(compiled: Any) -> dict[str, float]:
    """FLOPs and `optimal_seconds` per chip (cost_analysis is a dict or a one-dict list, by jax
    version)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    seconds = float(cost.get("optimal_seconds", float("nan")))
    # libtpu answers a negative time (seen: -7.0) for programs it cannot estimate.
    return {"flops": float(cost.get("flops", float("nan"))),
            "seconds": seconds if seconds >= 0 else float("nan")}


def count_while_loops(compiled: Any) -> int:
    """While loops in the compiled HLO (each one's body is costed once by XLA)."""
    return len(_WHILE.findall(compiled.as_text()))


@dataclasses.dataclass
class CompileReport:
    """What `mnemax compile` prints (`to_json`)."""

    recipe: str
    topology: str
    chips: int
    device_kind: str
    mesh: dict[str, int]
    hbm_bytes_per_chip: int
    step: dict[str, int]  # argument/temp/output/alias/peak/xla_peak bytes per chip
    init_peak_bytes: int
    init_xla_peak_bytes: int  # -1 where this jax does not report the heap simulation
    flops_per_chip: float
    estimated_step_s: float
    loops_counted_once: int
    compile_s: float  # init + train step
    estimate_compile_s: float  # the loop-free twin, 0 when the step has no loop to unroll
    step_cost_as_compiled: dict[str, float]  # the real step's flops / seconds, loops once

    @property
    def peak_bytes_per_chip(self) -> int:
        return max(self.step["peak_bytes"], self.init_peak_bytes)

    @property
    def fits_by(self) -> str:
        """What `fits` compares with the HBM: "heap_simulation" (libtpu's own check) or, where
        this jax reports no heap simulation, "sum" (arguments + temp + outputs - aliased)."""
        reported = self.step["xla_peak_bytes"] > 0 and self.init_xla_peak_bytes > 0
        return "heap_simulation" if reported else "sum"

    @property
    def required_bytes_per_chip(self) -> int:
        """The HBM the step and the init program need per chip, by `fits_by`."""
        if self.fits_by == "heap_simulation":
            return max(self.step["xla_peak_bytes"], self.init_xla_peak_bytes)
        return self.peak_bytes_per_chip

    @property
    def fits(self) -> bool:
        return self.required_bytes_per_chip <= self.hbm_bytes_per_chip

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "topology": self.topology, "chips": self.chips,
            "device_kind": self.device_kind, "mesh": self.mesh, "fits": self.fits,
            "fits_by": self.fits_by, "required_bytes_per_chip": self.required_bytes_per_chip,
            "hbm_bytes_per_chip": self.hbm_bytes_per_chip,
            "peak_bytes_per_chip": self.peak_bytes_per_chip,
            "argument_bytes": self.step["argument_bytes"], "temp_bytes": self.step["temp_bytes"],
            "output_bytes": self.step["output_bytes"], "alias_bytes": self.step["alias_bytes"],
            "step_peak_bytes": self.step["peak_bytes"], "init_peak_bytes": self.init_peak_bytes,
            "xla_peak_bytes": self.step["xla_peak_bytes"],
            "init_xla_peak_bytes": self.init_xla_peak_bytes,
            "flops_per_chip": self.flops_per_chip, "estimated_step_s": self.estimated_step_s,
            "estimate_excludes": "custom calls (Pallas kernels)",
            "loops_counted_once": self.loops_counted_once,
            "step_flops_as_compiled": self.step_cost_as_compiled["flops"],
            "step_s_as_compiled": self.step_cost_as_compiled["seconds"],
            "compile_s": self.compile_s, "estimate_compile_s": self.estimate_compile_s,
        }


# libtpu options of the costing twin: no windowed-einsum loops (see the module docstring).
TWIN_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def _compile_step(program: Any, options: dict[str, Any] | None = None) -> Any:
    return lower_train_step(program).compile(options)


def _compile_init(program: Any) -> Any:
    key = jax.eval_shape(lambda: jax.random.key(0))
    return program.init.lower(key).compile()


def estimate_twin_overrides(recipe: Any) -> list[str]:
    """Overrides that turn `recipe` into its loop-free twin (layers unrolled, the whole batch in
    one pass); empty when the recipe has neither loop."""
    overrides = []
    if getattr(recipe.model, "scan_layers", False):
        overrides.append("model.scan_layers=false")
    if recipe.run.grad_accum > 1:
        overrides.append("run.grad_accum=1")
    return overrides


def compile_recipe(recipe_arg: str, overrides: Sequence[str], topology: str, *,
                   log: Callable[[str], None] = lambda _msg: None) -> CompileReport:
    """Compiles `recipe_arg` (with `overrides`) for `topology`; see the module docstring."""
    from mnemax.recipes.registry import load_recipe
    from mnemax.trainer.setup import build_program

    devices = tpu_topology_devices(topology)
    hbm = tpu_hardware(devices[0]).memory_bytes
    recipe = load_recipe(recipe_arg, list(overrides))
    program = build_program(recipe, devices)
    log(f"compiling {recipe.name} for {topology} ({len(devices)} x {devices[0].device_kind}, "
        f"mesh {dict(program.mesh.shape)})")

    start = time.perf_counter()
    with _out_of_memory_is_a_misfit(recipe.name, topology):
        init_memory = _memory(_compile_init(program))
        step = _compile_step(program)
    compile_s = time.perf_counter() - start
    memory = _memory(step)
    # The twin below can take as long again: say what the step needs now, so a run stopped
    # during the twin has already given its memory figures.
    gib = 2.0**30
    log(f"step compiled in {compile_s:.0f} s: peak {memory['peak_bytes'] / gib:.2f} GiB per chip "
        f"(arguments {memory['argument_bytes'] / gib:.2f} + temp "
        f"{memory['temp_bytes'] / gib:.2f}) of {hbm / gib:.2f}")

    twin_overrides = estimate_twin_overrides(recipe)
    start = time.perf_counter()
    needs_twin = bool(twin_overrides) or count_while_loops(step) > 0
    if needs_twin:
        log(f"costing the loop-free twin ({', '.join(twin_overrides) or 'the same recipe'}, "
            "the ops' own loops unrolled, no collective-matmul loops)")
        # A program of its own, traced anew: jit would reuse the step's trace, loops included.
        twin_program = build_program(load_recipe(recipe_arg, [*overrides, *twin_overrides]),
                                     devices)
        with dispatch.unrolled_loops():
            twin = _compile_step(twin_program, TWIN_COMPILER_OPTIONS)
    else:
        twin = step
    cost, as_compiled = _cost(twin), _cost(step)
    estimate_s = time.perf_counter() - start if needs_twin else 0.0

    return CompileReport(
        recipe=recipe.name, topology=topology, chips=len(devices),
        device_kind=devices[0].device_kind,
        mesh={k: int(v) for k, v in program.mesh.shape.items()}, hbm_bytes_per_chip=hbm,
        step=memory, init_peak_bytes=init_memory["peak_bytes"],
        init_xla_peak_bytes=init_memory["xla_peak_bytes"], flops_per_chip=cost["flops"],
        estimated_step_s=cost["seconds"], loops_counted_once=count_while_loops(twin),
        compile_s=compile_s, estimate_compile_s=estimate_s,
        step_cost_as_compiled=as_compiled)


_FITS_BY = {"heap_simulation": "the compiler's heap simulation, as libtpu's own HBM check",
            "sum": "arguments + temp + outputs - aliased"}

_MISFIT_FIX = ("shard more (strategy.zero_stage=3, a larger fsdp axis), recompute more "
               "(strategy.remat=full), or use more chips or a smaller data.global_batch / larger "
               "run.grad_accum (`mnemax plan --topology` searches these)")


@contextlib.contextmanager
def _out_of_memory_is_a_misfit(recipe: str, topology: str) -> Iterator[None]:
    """The TPU compiler refuses a program that exceeds the chip's HBM (RESOURCE_EXHAUSTED):
    that is the answer "does not fit", given as a CompileError with the compiler's figures."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        said = str(err).strip().splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
        raise CompileError(f"{recipe} does not fit {topology}: the TPU compiler says \"{said}\"; "
                           f"{_MISFIT_FIX}") from None


def require_fit(report: CompileReport) -> None:
    """CompileError when the step (or init) needs more than the chip's HBM."""
    if not report.fits:
        raise CompileError(
            f"{report.recipe} does not fit {report.topology}: it needs "
            f"{report.required_bytes_per_chip / GIB:.2f} GiB per chip "
            f"({_FITS_BY[report.fits_by]}), the {report.device_kind} has "
            f"{report.hbm_bytes_per_chip / GIB:.0f} GiB; {_MISFIT_FIX}")


def print_report(report: CompileReport) -> None:
    """The human-readable form of `report`."""
    def gib(n: float) -> str:
        return f"{n / GIB:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"

    s = report.step
    print(f"{report.recipe} on {report.topology}: {report.chips} x {report.device_kind}, "
          f"mesh {report.mesh}")
    print(f"  per chip: arguments {gib(s['argument_bytes'])}, temp {gib(s['temp_bytes'])}, "
          f"outputs {gib(s['output_bytes'])}, aliased {gib(s['alias_bytes'])}")
    print(f"  peak {gib(report.peak_bytes_per_chip)} (arguments + temp + outputs - aliased; "
          f"step {gib(s['peak_bytes'])}, init {gib(report.init_peak_bytes)})"
          + (f"; the compiler's heap simulation peaks at {gib(s['xla_peak_bytes'])}"
             if s["xla_peak_bytes"] > 0 else ""))
    print(f"  needs {gib(report.required_bytes_per_chip)} ({_FITS_BY[report.fits_by]}) of "
          f"{gib(report.hbm_bytes_per_chip)} HBM: " + ("fits" if report.fits else "DOES NOT FIT"))
    loops = (f"; {report.loops_counted_once} loop(s) counted once"
             if report.loops_counted_once else "")
    print(f"  {report.flops_per_chip / 1e12:.1f} TFLOP per chip; compiler's step estimate "
          f"{report.estimated_step_s:.3f} s (without custom calls{loops})")
    print(f"  compiled in {report.compile_s:.1f} s"
          + (f" (+ {report.estimate_compile_s:.1f} s costing the unrolled twin)"
             if report.estimate_compile_s else ""))
