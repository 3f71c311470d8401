"""One process: a damaged newest checkpoint falls back to the previous one, events.jsonl, the
compilation cache's directory, the cluster flags."""

import argparse

import pytest

from mnemax.errors import ConfigError
from mnemax.launch.cli import main
from mnemax.launch.distributed import add_cluster_args, cluster_spec
from mnemax.launch.local import exit_code, process_env
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.compile_cache import cache_dir_for, default_cache_dir
from mnemax.trainer.config import RunConfig
from mnemax.trainer.events import read_events
from mnemax.trainer.loop import train
from tests.helpers import SMALL, read_metrics


def test_damaged_newest_checkpoint_falls_back_with_one_line(tmp_path, small_recipe, capsys,
                                                            caplog):
    every = ("checkpoint.every=2", "checkpoint.keep=5", "schedule.decay_steps=8")
    train(small_recipe(*every, "run.steps=4"), tmp_path)
    before = read_metrics(tmp_path)
    files = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    capsys.readouterr()

    args = ["train", "tiny", "--run-dir", str(tmp_path)]
    for item in (*SMALL, *every, "run.steps=6"):
        args += ["--set", item]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    lines = [x for x in out.splitlines() if "skipping checkpoint step 4" in x]
    assert len(lines) == 1 and "damaged" in lines[0] and "resuming from step 2" in lines[0], out
    assert "Traceback" not in out + caplog.text and "asyncio" not in out + caplog.text
    # Nothing deleted: the damaged checkpoint is kept beside the others, under another name.
    assert (tmp_path / "checkpoints" / "damaged-4" / "state").is_dir()
    assert Checkpointer(tmp_path / "checkpoints", small_recipe().checkpoint).all_steps() == [
        2, 4, 6]
    # Steps 3-4 were trained again from step 2's state and data position: same losses.
    after = read_metrics(tmp_path)
    for step in (3, 4):
        assert after[step]["loss"] == before[step]["loss"]
    kinds = [(e["kind"], e["step"]) for e in read_events(tmp_path)]
    assert kinds == [("start", 0), ("end", 4), ("fallback", 2), ("resume", 2), ("end", 6)]
    fallback = read_events(tmp_path)[2]
    assert fallback["skipped_step"] == 4 and fallback["time"].endswith("+00:00")


def test_compile_cache_directory(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/xla")
    assert cache_dir_for(RunConfig()) == "/shared/xla"
    assert cache_dir_for(RunConfig(compile_cache_dir="gs://b/xla")) == "gs://b/xla"
    assert cache_dir_for(RunConfig(compile_cache_dir="")) is None
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/u/.cache")
    assert cache_dir_for(RunConfig()) == default_cache_dir() == "/home/u/.cache/mnemax/xla"


def parse_cluster(*argv: str):
    parser = argparse.ArgumentParser()
    add_cluster_args(parser)
    return cluster_spec(parser.parse_args(argv))


def test_cluster_flags():
    spec = parse_cluster("--coordinator", "h:1234", "--num-processes", "4", "--process-id", "3")
    assert (spec.coordinator, spec.num_processes, spec.process_id) == ("h:1234", 4, 3)
    assert parse_cluster().coordinator is None
    with pytest.raises(ConfigError, match="--coordinator given without --num-processes, "
                                          "--process-id"):
        parse_cluster("--coordinator", "h:1234")
    with pytest.raises(ConfigError, match=r"--process-id 4 is not in \[0, --num-processes 4\)"):
        parse_cluster("--coordinator", "h:1", "--num-processes", "4", "--process-id", "4")


def test_local_launcher_environment_and_exit_codes(capsys):
    env = process_env(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1",
                          "MNEMAX_COORDINATOR": "x:1"})
    assert env["XLA_FLAGS"] == "--foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu" and "MNEMAX_COORDINATOR" not in env
    assert [exit_code(c) for c in (0, 1, -9, -15)] == [0, 1, 137, 143]
    assert main(["launch", "local", "tiny", "--processes", "4", "--devices", "6"]) == 2
    assert "--devices 6 is not a multiple of --processes 4" in capsys.readouterr().err
