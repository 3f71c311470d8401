"""Tracking, logs and profiling of a training run (issue 17): wandb offline with resume,
`train.log`, unwrapped piped output, a profile trace, data-wait / checkpoint / compile times in
`metrics.jsonl`, and replaying a run's `recipe.json`.

One module-scoped set of three short CLI runs (in-process, stdout and stderr to files as when
piped) serves most assertions: `first` trains 3 steps with both trackers and a profile of step
2, `resume` continues it to step 4, `replay` trains `first/recipe.json` into a new run dir.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
import struct
import sys
import time
from pathlib import Path

import pytest
from absl import logging as absl_logging

import mnemax.trainer.loop as loop
from mnemax.errors import ConfigError
from mnemax.launch.cli import main
from mnemax.recipes.registry import builtin_names, load_recipe
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.config import RunConfig
from mnemax.trainer.metrics import MetricsWriter, format_train_line
from mnemax.trainer.recipe import recipe_to_dict
from tests.helpers import SMALL, read_metrics

# Sleeps added to every batch fetch and checkpoint save of the first run. Each logged record
# (log_every=1) covers one fetch, so its data_wait_s is DATA_DELAY plus the real fetch of a
# 16 x 33 token batch (well under a millisecond): >= DATA_DELAY, and < 2 * DATA_DELAY unless two
# fetches were counted (or time since the run began); the 150 ms of slack cover scheduling
# delays on a loaded machine. Likewise checkpoint_s of the record after the step-2 save is
# >= SAVE_DELAY and < 2 * SAVE_DELAY (orbax's async save of a 115k-parameter state returns in
# ~50 ms), and exactly 0 where no save happened.
DATA_DELAY = 0.15
SAVE_DELAY = 0.4
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 ")


class _SlowBatches:
    """The loop's batch iterator with a sleep in every fetch."""

    def __init__(self, inner):
        self._inner = inner

    def __next__(self):
        time.sleep(DATA_DELAY)
        return next(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _cli(args: list[str], out: Path) -> tuple[int, str, str, float]:
    """`mnemax *args` in this process with stdout / stderr going to files (not a TTY)."""
    with (open(out.with_suffix(".out"), "w") as o, open(out.with_suffix(".err"), "w") as e,
          contextlib.redirect_stdout(o), contextlib.redirect_stderr(e)):
        began = time.perf_counter()
        code = main(args)
        wall = time.perf_counter() - began
    return (code, out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text(),
            wall)


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    first, replay = root / "first", root / "replay"
    (root / "wandb").mkdir()
    absl_records = _Records()
    logging.getLogger("absl").addHandler(absl_records)
    # schedule.decay_steps=40: the train step of tests/launch/test_multiprocess.py's reference
    # run, which the suite's shared compilation cache then already holds.
    common = _sets(*SMALL, "schedule.decay_steps=40", "run.trackers=tensorboard,wandb",
                   "run.profile=2:1")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root / "wandb"))
        with pytest.MonkeyPatch.context() as slow:
            iterator, save = loop.train_iterator, Checkpointer.save
            slow.setattr(loop, "train_iterator", lambda *a, **k: _SlowBatches(iterator(*a, **k)))
            slow.setattr(Checkpointer, "save",
                         lambda self, *a, **k: (time.sleep(SAVE_DELAY), save(self, *a, **k))[1])
            out["first"] = _cli(["train", "tiny", "--run-dir", str(first), *common,
                                 *_sets("run.steps=3", "checkpoint.every=2")], root / "first")
        first_log = (first / "train.log").read_text()
        out["resume"] = _cli(["train", "tiny", "--run-dir", str(first), *common,
                              *_sets("run.steps=4", "checkpoint.every=2")], root / "resume")
        out["replay"] = _cli(["train", str(first / "recipe.json"), "--run-dir", str(replay),
                              "--set", "run.trackers="], root / "replay")
    absl_logging.warning("an absl warning of someone else's")  # must still get through
    logging.getLogger("absl").removeHandler(absl_records)
    return {"root": root, "first": first, "replay": replay, "out": out,
            "first_log": first_log, "absl": absl_records.messages}


def test_runs_complete(runs):
    for name, (code, _, err, _) in runs["out"].items():
        assert code == 0, (name, err)


def test_metrics_have_data_wait_checkpoint_and_compile_times(runs):
    metrics = read_metrics(runs["first"])
    assert sorted(metrics) == [1, 2, 3, 4]
    for step in (1, 2, 3):
        assert DATA_DELAY <= metrics[step]["data_wait_s"] < 2 * DATA_DELAY, metrics[step]
    # Saves at step 2 (checkpoint.every) after step 2's record, and at the end (step 3, after
    # the last record): step 3's record holds the first, no record the second.
    assert metrics[1]["checkpoint_s"] == metrics[2]["checkpoint_s"] == 0.0
    assert SAVE_DELAY <= metrics[3]["checkpoint_s"] < 2 * SAVE_DELAY
    # The compile time once per process, in its first record: step 1, then step 4 (resume).
    first_wall = runs["out"]["first"][3]
    assert 0 < metrics[1]["compile_s"] < first_wall
    assert "compile_s" not in metrics[2] and "compile_s" not in metrics[3]
    assert metrics[4]["compile_s"] > 0
    assert metrics[4]["checkpoint_s"] == 0.0 and metrics[4]["data_wait_s"] < DATA_DELAY


def _wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file: a LevelDB-style log (7-byte header `:W&B`,
    magic, version; 32 KiB blocks of `crc32c u32, length u16, type u8` + payload; types
    1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_run(run_dir: Path) -> tuple[str, dict, list[dict]]:
    """(run id, config, history rows) of one offline wandb run directory."""
    (path,) = run_dir.glob("run-*.wandb")
    run_id, config, history = None, {}, []
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
    return run_id, config, history


def test_wandb_offline_run_holds_recipe_and_metrics_and_resume_continues_it(runs):
    run_id = (runs["first"] / "wandb_run_id").read_text().strip()
    dirs = sorted((runs["root"] / "wandb" / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in dirs), dirs
    metrics = read_metrics(runs["first"])
    recipe = json.loads((runs["first"] / "recipe.json").read_text())
    for directory, steps in zip(dirs, ([1, 2, 3], [4]), strict=True):
        got_id, config, history = _wandb_run(directory)
        assert got_id == run_id
        assert config["model"] == recipe["model"] and config["data"] == recipe["data"]
        assert [row["step"] for row in history] == steps
        for row in history:
            assert row["loss"] == pytest.approx(metrics[row["step"]]["loss"], rel=1e-6)
    assert not (runs["replay"] / "wandb_run_id").exists()  # run.trackers= : none
    assert not (runs["replay"] / "tensorboard").exists()
    assert any((runs["first"] / "tensorboard").iterdir())


def test_profile_trace_of_the_window(runs):
    traces = list((runs["first"] / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0  # the resume (step 4) traced none
    (perfetto,) = traces[0].parent.glob("*.trace.json.gz")
    names = {e.get("name", "") for e in json.loads(gzip.decompress(perfetto.read_bytes()))[
        "traceEvents"]}
    assert any("train_step" in name for name in names)
    assert "profile of steps 2-2 written to" in runs["out"]["first"][1]


def test_log_file_has_timestamped_console_lines(runs):
    log_lines = runs["first_log"].splitlines()
    assert log_lines and all(STAMP.match(line) for line in log_lines), log_lines[:3]
    printed = [line for line in runs["out"]["first"][1].splitlines() if line.strip()]
    assert [STAMP.sub("", line) for line in log_lines] == printed
    resumed = (runs["first"] / "train.log").read_text()
    assert resumed.startswith(runs["first_log"]) and "step 4/4" in resumed  # appended


def test_piped_output_is_not_wrapped_and_has_elapsed_and_eta(runs):
    first = runs["first"]
    lines = runs["out"]["first"][1].splitlines()
    header = [line for line in lines if line.startswith("tiny:")]
    assert len(header) == 1 and header[0].endswith(f"run dir {first}") and len(header[0]) > 80
    (step3,) = [line for line in lines if line.startswith("step 3/3 ")]
    found = re.search(r" \| elapsed (\d+):(\d\d):(\d\d) \| ETA 0:00:00$", step3)
    assert found, step3
    hours, minutes, seconds = map(int, found.groups())
    elapsed = 3600 * hours + 60 * minutes + seconds  # rounded to the second: +-0.5
    # The clock starts when training starts (after the CLI parsed and loaded the recipe) and
    # the compile is part of it.
    assert read_metrics(first)[1]["compile_s"] - 0.5 <= elapsed <= runs["out"]["first"][3] + 0.5


def test_no_type_handler_registry_warning(runs):
    for _, out, err, _ in runs["out"].values():
        assert "Type handler registry" not in out + err
    assert not [m for m in runs["absl"] if "Type handler registry" in m]
    assert "an absl warning of someone else's" in runs["absl"]


def test_replaying_recipe_json_reproduces_the_run(runs):
    first = json.loads((runs["first"] / "recipe.json").read_text())
    replay = json.loads((runs["replay"] / "recipe.json").read_text())
    assert replay["run"].pop("trackers") == [] and first["run"].pop("trackers") == [
        "tensorboard", "wandb"]
    assert replay == first
    a, b = read_metrics(runs["first"]), read_metrics(runs["replay"])
    assert [a[s]["loss"] for s in (1, 2, 3, 4)] == [b[s]["loss"] for s in (1, 2, 3, 4)]


def test_format_train_line_elapsed_and_eta():
    record = {"step": 120, "loss": 2.10344, "lr": 2.9e-3, "grad_norm": 0.41}
    line = format_train_line(record, 300, elapsed_s=3725.4, eta_s=59.6)
    assert line == ("step 120/300 | loss 2.1034 | lr 2.90e-03 | gnorm 0.410 | "
                    "elapsed 1:02:05 | ETA 0:01:00")
    assert format_train_line(record, 300, elapsed_s=90_061.0).endswith("elapsed 25:01:01")


def test_run_profile_and_trackers_values():
    assert RunConfig(profile="10:5").profile_steps == (10, 14)
    assert RunConfig().profile_steps is None
    for bad in ("10", "0:2", "3:0", "a:b", "1:2:3"):
        with pytest.raises(ConfigError, match="START:STEPS"):
            RunConfig(profile=bad)
    with pytest.raises(ConfigError, match="after the run's last step"):
        load_recipe("tiny", ["run.steps=3", "run.profile=4:1"])
    assert load_recipe("tiny", ["run.trackers=tensorboard,wandb"]).run.trackers == (
        "tensorboard", "wandb")
    assert load_recipe("tiny", ["run.trackers="]).run.trackers == ()
    assert RunConfig(trackers="wandb").trackers == ("wandb",)
    with pytest.raises(ConfigError, match="mlflow"):
        load_recipe("tiny", ["run.trackers=mlflow"])


def test_missing_wandb_names_the_install_and_only_process_0_tracks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'mnemax\[wandb\]'"):
        MetricsWriter(tmp_path, trackers=("wandb",))
    quiet = MetricsWriter(tmp_path, trackers=("tensorboard", "wandb"), enabled=False)
    assert quiet.trackers == [] and not list(tmp_path.iterdir())


def test_recipe_json_round_trips_every_builtin_and_rejects_bad_files(tmp_path):
    path = tmp_path / "recipe.json"
    for name in builtin_names():
        recipe = load_recipe(name)
        path.write_text(json.dumps(recipe_to_dict(recipe)))
        assert load_recipe(str(path)) == recipe, name
    assert load_recipe(str(path), ["run.steps=7"]).run.steps == 7
    path.write_text('{"model": {')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_recipe(str(path))
    data = recipe_to_dict(load_recipe("tiny"))
    data["run"]["stesp"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown key run\.stesp.*did you mean run\.steps"):
        load_recipe(str(path))
    data = recipe_to_dict(load_recipe("tiny"))
    data["model"]["_type"] = "mnemax.nowhere.Config"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not an importable model config class"):
        load_recipe(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing" / "recipe.json"))

