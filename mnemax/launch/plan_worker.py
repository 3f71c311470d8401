"""The planner's JAX side: builds, traces and compiles one candidate configuration at a time.

`mnemax plan` runs this module as a subprocess (`python -m mnemax.launch.plan_worker`) with
`JAX_PLATFORMS=cpu` and `--xla_force_host_platform_device_count=<devices>`, so that configurations
for more devices than the machine has are compiled on fake CPU devices; XLA:CPU's memory analysis
then stands in for the accelerator's. Requests are JSON lines on stdin, answers JSON lines on
stdout prefixed with `ANSWER_PREFIX`. `Measurer` also runs in-process where the process already
has the devices (tests). `SubprocessWorker` and `InProcessWorker` are the planner's handles on
it, and `MeasurementCache` keeps its answers on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mnemax.errors import MnemaxError

ANSWER_PREFIX = "@plan-answer "


def _jaxpr_names(jaxpr: Any, found: set[str]) -> None:
    """Adds the `checkpoint_name` tags in `jaxpr` and its sub-jaxprs to `found`."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":
            found.add(eqn.params["name"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _jaxpr_names(inner, found)


def _aval_bytes(aval: Any) -> int:
    return math.prod(aval.shape) * aval.dtype.itemsize


class Measurer:
    """Measures candidates of one recipe (`recipe` name or path + `overrides`) on this
    process's first `devices` devices; each method takes the candidate's extra overrides."""

    def __init__(self, recipe: str, overrides: list[str], devices: int) -> None:
        import jax

        self.recipe, self.overrides = recipe, list(overrides)
        self.devices = jax.devices()[:devices]
        if len(self.devices) < devices:
            raise MnemaxError(f"the planner's worker sees {len(self.devices)} devices, not "
                              f"{devices}")

    def _program(self, extra: list[str]) -> Any:
        from mnemax.recipes.registry import load_recipe
        from mnemax.trainer.setup import build_program

        return build_program(load_recipe(self.recipe, [*self.overrides, *extra]), self.devices)

    def state(self, extra: list[str]) -> dict[str, Any]:
        """Device and host bytes of params, grads and optimizer state by shardings, and the
        bytes of the whole (unsharded) parameters."""
        import jax

        from mnemax.trainer.memory_report import state_bytes

        program = self._program(extra)
        whole = sum(_aval_bytes(p) for p in jax.tree.leaves(program.abstract_state.params))
        return {**state_bytes(program), "params": program.param_count,
                "params_whole_bytes": whole}

    def residuals(self, extra: list[str], rows: int) -> dict[str, Any]:
        """Bytes of what the backward pass keeps (the vjp's residuals) for `rows` sequences
        with whole parameters, traced without compiling: `activation_bytes` (not counting the
        parameters themselves) and `cast_bytes` (parameters cast to the compute dtype), plus
        the `checkpoint_name` tags the model uses."""
        import jax
        import jax.numpy as jnp

        program = self._program(extra)
        loss_fn = program.loss_fn
        tokens = jax.ShapeDtypeStruct((rows, program.recipe.data.seq_len), jnp.int32)
        closed = jax.make_jaxpr(
            lambda p, i, t: jax.vjp(lambda q: loss_fn(q, i, t)[0], p))(
            program.abstract_state.params, tokens, tokens)
        jaxpr = closed.jaxpr
        inputs = {id(v) for v in jaxpr.invars}
        producer = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
        activation = cast = 0
        for var in jaxpr.outvars[1:]:  # outvars[0] is the loss; the rest are residuals
            if type(var).__name__ == "Literal" or id(var) in inputs:  # the params themselves
                continue
            eqn = producer.get(id(var))
            if (eqn is not None and eqn.primitive.name == "convert_element_type"
                    and id(eqn.invars[0]) in inputs):
                cast += _aval_bytes(var.aval)
            else:
                activation += _aval_bytes(var.aval)
        names: set[str] = set()
        _jaxpr_names(jaxpr, names)
        return {"activation_bytes": activation, "cast_bytes": cast, "names": sorted(names)}

    def compile(self, extra: list[str]) -> dict[str, Any]:
        """XLA's memory analysis of the compiled train step and its device peak."""
        from mnemax.trainer.memory_report import compiled_memory, state_bytes, step_peak_bytes

        program = self._program(extra)
        raw = compiled_memory(program)
        sharded = state_bytes(program)
        host = sharded["host_params_bytes"] + sharded["host_opt_state_bytes"]
        return {**raw, "host_state_bytes": host, "peak_bytes": step_peak_bytes(raw, host),
                "platform": self.devices[0].platform}

    def tpu_compile(self, extra: list[str], topology: str) -> dict[str, Any]:
        """The real TPU compiler's figures for the candidate on `topology`'s chips
        (`mnemax.launch.compile`): the step's peak and the compiler's step estimate with loop
        bodies counted by their trip counts."""
        from mnemax.launch.compile import CompileError, compile_recipe

        try:
            report = compile_recipe(self.recipe, [*self.overrides, *extra], topology)
        except CompileError as err:  # the compiler refused it: more than the chip's HBM
            return {"error": str(err), "kind": "oom"}
        # Judged as `mnemax compile` judges a fit: the compiler's heap simulation where reported.
        return {**report.step, "peak_bytes": report.required_bytes_per_chip,
                "compiled_step_s": report.estimated_step_s, "platform": "tpu",
                "compile_s": report.compile_s + report.estimate_compile_s}

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Runs one request `{"op": "state"|"residuals"|"compile"|"tpu_compile", "overrides":
        [...], ...}`;
        a configuration that cannot be built or compiled answers `{"error": message}`."""
        op, extra = request["op"], request["overrides"]
        try:
            if op == "state":
                return self.state(extra)
            if op == "residuals":
                return self.residuals(extra, request["rows"])
            if op == "compile":
                return self.compile(extra)
            if op == "tpu_compile":
                return self.tpu_compile(extra, request["topology"])
        except MnemaxError as err:
            return {"error": str(err), "kind": "config"}
        except Exception as err:
            return failure_answer(err)
        raise ValueError(f"unknown planner request {op!r}")


def failure_answer(err: Exception) -> dict[str, Any]:
    """The answer for a measurement that raised: XLA refusing to compile a configuration or
    running out of memory is a result (`kind` "compile" or "oom": the candidate does not fit);
    anything else is a failure of the planner itself (`kind` "error", with the traceback), which
    the planner reports as an error instead of ranking the candidate as not fitting."""
    import traceback

    import jax

    first_line = (str(err).splitlines() or [""])[0][:300]
    message = f"{type(err).__name__}: {first_line}"
    if isinstance(err, jax.errors.JaxRuntimeError):
        oom = "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()
        return {"error": message, "kind": "oom" if oom else "compile"}
    return {"error": message, "kind": "error", "traceback": traceback.format_exc()}


def _code_fingerprint() -> str:
    """Hash of mnemax's sources and jax's version: cached measurements expire with them."""
    import jax

    digest = hashlib.sha256(jax.__version__.encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class MeasurementCache:
    """Worker answers on disk, one JSON file per (request, resolved recipe, devices, code)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.fingerprint = _code_fingerprint() if directory is not None else ""

    def _path(self, request: dict[str, Any], recipe_json: str, devices: int) -> Path:
        key = json.dumps([request, recipe_json, devices, self.fingerprint], sort_keys=True)
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def get(self, request: dict[str, Any], recipe_json: str, devices: int) -> dict | None:
        if self.directory is None:
            return None
        path = self._path(request, recipe_json, devices)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def put(self, request: dict[str, Any], recipe_json: str, devices: int, answer: dict) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(request, recipe_json, devices)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(answer))
        tmp.replace(path)


class SubprocessWorker:
    """`plan_worker` in a child process on `devices` fake CPU devices."""

    def __init__(self, recipe: str, overrides: list[str], devices: int) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        # Lives as long as the worker; closed in close().
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mnemax.launch.plan_worker", recipe, str(devices),
             json.dumps(overrides)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=env)
        self._read()

    def _read(self) -> dict[str, Any]:
        for line in self._proc.stdout:
            if line.startswith(ANSWER_PREFIX):
                return json.loads(line[len(ANSWER_PREFIX):])
        self._proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read()[-3000:]
        raise RuntimeError(f"the planner's worker exited with status {self._proc.returncode}:"
                           f"\n{tail}")

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._stderr.close()


class InProcessWorker:
    """`plan_worker`'s `Measurer` in this process (which must have the devices)."""

    def __init__(self, recipe: str, overrides: list[str], devices: int) -> None:
        self._measurer = Measurer(recipe, overrides, devices)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(self._measurer.answer(request)))

    def close(self) -> None:
        pass


def main(argv: list[str]) -> int:
    """`plan_worker RECIPE DEVICES OVERRIDES_JSON`: answers requests until stdin closes."""
    recipe, devices, overrides = argv[0], int(argv[1]), json.loads(argv[2])
    measurer = Measurer(recipe, overrides, devices)
    print(ANSWER_PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(ANSWER_PREFIX + json.dumps(measurer.answer(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
