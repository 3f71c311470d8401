"""End-to-end training: loss falls, resume after SIGKILL is exact, SIGTERM saves, bad inputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mnemax.errors import CheckpointError
from mnemax.launch.cli import main
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.loop import train
from tests.helpers import SMALL, read_metrics

UNIGRAM_ENTROPY_NATS = 3.27  # byte unigram entropy of the stdlib corpus (measured)


def finalized_steps(run_dir: Path) -> list[int]:
    """Checkpoint steps orbax has finished writing (it renames a temporary dir when done)."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return []
    return [int(p.name) for p in root.iterdir()
            if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists()]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnemax.launch.cli", *args]


@pytest.mark.optimized_xla  # 50 steps of the full tiny model: running, not compiling
def test_tiny_recipe_trains(tmp_path):
    recipe = load_recipe("tiny", ["run.steps=50", "run.log_every=1", "eval.every=25",
                                  "checkpoint.every=0"])
    result = train(recipe, tmp_path)
    assert result.status == "completed" and result.final_step == 50
    metrics = read_metrics(tmp_path)
    first, last = metrics[1]["loss"], metrics[50]["loss"]
    # Step 1 is near ln(320) = 5.77 (uniform); 50 steps must take off at least 2 nats and go
    # below the unigram entropy, i.e. the model uses context.
    assert first > 5.0
    assert last < first - 2.0, (first, last)
    assert last < UNIGRAM_ENTROPY_NATS
    assert metrics[25]["eval_loss"] < first - 1.0
    # Bits per byte of the byte tokenizer: the eval targets' nats over the bytes they spell,
    # i.e. every target but eos (id 256) is one byte.
    from mnemax.trainer.data import eval_batches

    targets = np.concatenate([b[:, 1:] for b in eval_batches(recipe.data, recipe.eval.batches)])
    spelled = int(np.sum(targets != 256))
    assert metrics[25]["eval_bpb"] == pytest.approx(
        metrics[25]["eval_loss"] * targets.size / spelled / np.log(2), rel=1e-6)
    for key in ("tokens_per_sec", "mfu", "lr", "grad_norm"):
        assert key in metrics[50]
    assert (tmp_path / "recipe.json").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    common = []
    for item in (*SMALL, "schedule.decay_steps=40", "checkpoint.every=10", "checkpoint.keep=10"):
        common += ["--set", item]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli("train", "tiny", "--run-dir", str(whole), *common,
                       "--set", "run.steps=40"), check=True, capture_output=True)

    proc = subprocess.Popen(cli("train", "tiny", "--run-dir", str(killed), *common,
                                "--set", "run.steps=100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill once a checkpoint is on disk and training has gone past it.
    while not (finalized_steps(killed) and max(read_metrics(killed), default=0)
               > min(finalized_steps(killed)) + 1):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = Checkpointer(killed / "checkpoints", load_recipe("tiny").checkpoint).latest_step()
    assert saved is not None and 10 <= saved < 40, saved

    subprocess.run(cli("train", "tiny", "--run-dir", str(killed), *common,
                       "--set", "run.steps=40"), check=True, capture_output=True)
    a, b = read_metrics(whole), read_metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in range(1, 41):
        assert a[step]["loss"] == b[step]["loss"], step  # bitwise, same data order
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    args = ["train", "tiny", "--run-dir", str(tmp_path)]
    for item in SMALL:
        args += ["--set", item]
    proc = subprocess.Popen(cli(*args, "--set", "run.steps=100000"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while max(read_metrics(tmp_path), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received: saved checkpoint at step" in out
    step = Checkpointer(tmp_path / "checkpoints", load_recipe("tiny").checkpoint).latest_step()
    assert step is not None and step >= 3
    result = train(load_recipe("tiny", [*SMALL, f"run.steps={step + 2}"]), tmp_path)
    assert result.status == "completed" and result.final_step == step + 2


def test_nonfinite_loss_halts_and_keeps_last_good_checkpoint(tmp_path):
    recipe = load_recipe("tiny", [*SMALL, "optimizer.learning_rate=1e30", "optimizer.clip_norm=0",
                                  "schedule.warmup_steps=0", "checkpoint.every=1",
                                  "checkpoint.keep=10", "run.steps=10"])
    result = train(recipe, tmp_path)
    assert result.status == "halted_nonfinite"
    steps = Checkpointer(tmp_path / "checkpoints", recipe.checkpoint).all_steps()
    assert steps and max(steps) < result.final_step
    assert result.last_checkpoint == max(steps)


def test_nonfinite_skip_policy_leaves_params_unchanged(tmp_path):
    recipe = load_recipe("tiny", [*SMALL, "optimizer.learning_rate=1e30", "optimizer.clip_norm=0",
                                  "schedule.warmup_steps=0", "checkpoint.every=1",
                                  "checkpoint.keep=10", "run.steps=4", "run.nan_policy=skip"])
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    assert metrics[1]["finite"] == 1.0 and metrics[3]["finite"] == 0.0
    from mnemax.trainer.checkpoint import abstract_with_shardings
    from mnemax.trainer.setup import build_program
    program = build_program(recipe)
    target = abstract_with_shardings(program.abstract_state, program.state_shardings)
    ckpt = Checkpointer(tmp_path / "checkpoints", recipe.checkpoint)
    after_first = ckpt.restore(1, target)[0].params
    at_end = ckpt.restore(4, target)[0].params
    ckpt.close()
    for a, b in zip(jax.tree.leaves(after_first), jax.tree.leaves(at_end), strict=True):
        np.testing.assert_array_equal(a, b)


def test_truncated_checkpoint_is_reported(tmp_path, capsys):
    recipe = load_recipe("tiny", [*SMALL, "run.steps=2"])
    train(recipe, tmp_path)
    files = [p for p in (tmp_path / "checkpoints" / "2" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"checkpoints/2 could not be read.*damaged.*Move "
                                              r".*checkpoints/2 out of .* to resume from the "
                                              r"previous"):
        train(load_recipe("tiny", [*SMALL, "run.steps=4"]), tmp_path)
    args = ["train", "tiny", "--run-dir", str(tmp_path), "--set", "run.steps=4"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and "Traceback" not in err


def test_missing_data_dir_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["train", "tiny", "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.source={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and "mnemax data prepare" in err


def _write_corpus(tmp_path: Path, kind: str) -> Path:
    """Six documents of 600 random words, in the input format `kind`, under `tmp_path`; the
    text field is `body`."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "memory", "layer", "key", "value"]
    docs = [" ".join(rng.choice(words, 600)) for _ in range(6)]
    if kind == "jsonl":  # one document per line, split per document
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"body": docs}), path)
    elif kind == "txt":  # one document per file
        path = tmp_path / "corpus"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i}.txt").write_text(d)
        path = path / "*.txt"
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "txt", "save_to_disk"])
def test_prepare_then_train_and_eval_on_it(tmp_path, capsys, kind):
    # The train and eval programs are the same for every format: after the first, they load
    # from the suite's compilation cache.
    corpus = _write_corpus(tmp_path, kind)
    out = tmp_path / "tokens"
    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", "bytes",
                 "--text-field", "body", "--out", str(out), "--val-percent", "20"]) == 0
    assert (out / "metadata.json").exists()
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--set", f"data.source={out}"]
    for item in SMALL:
        args += ["--set", item]
    assert main(["train", "tiny", *args, "--set", "run.steps=3"]) == 0
    capsys.readouterr()
    assert main(["eval", "tiny", *args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 3 and np.isfinite(result["eval_loss"])
    assert result["eval_ppl"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-6)


def test_changed_model_refuses_to_resume(tmp_path):
    train(load_recipe("tiny", [*SMALL, "run.steps=1"]), tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.num_layers: checkpoint 2 vs recipe 3"):
        train(load_recipe("tiny", [*SMALL, "run.steps=2", "model.num_layers=3"]), tmp_path)

