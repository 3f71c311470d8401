"""Multi-process training with `mnemax launch local` (JAX's distributed runtime on CPU).

Each launch costs ~15 s of start-up and compilation on a 2-core machine, so one 4-process job
checks several things at once: equal losses to one process, process-0-only outputs, the agreed
SIGTERM save and a bitwise resume (a second 4-process launch); a 2-process job checks that a
SIGKILLed process stops the job, and another that a non-finite loss halts every process.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import psutil  # an orbax dependency
import pytest

from mnemax.trainer.checkpoint import CheckpointConfig, Checkpointer, abstract_with_shardings
from mnemax.trainer.events import read_events
from mnemax.trainer.loop import train
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL, read_metrics

SCHEDULE = ("schedule.decay_steps=40",)  # the lr does not depend on run.steps
EVERY = ("checkpoint.every=2", "checkpoint.keep=100")


@pytest.fixture
def launch():
    """`launch(run_dir, processes, devices, *flags, sets=(...))` starts `mnemax launch local`
    with `--set` SMALL, SCHEDULE, run.steps=100000 and then `sets`; whatever of it still runs
    when the test ends (a failed assertion) is killed."""
    started: list[subprocess.Popen] = []
    yield lambda *args, **kw: started.append(_launch(*args, **kw)) or started[-1]
    for proc in started:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.communicate()


def _launch(run_dir: Path, processes: int, devices: int, *extra: str,
            sets: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [sys.executable, "-m", "mnemax.launch.cli", "launch", "local", "tiny",
            "--processes", str(processes), "--devices", str(devices), "--run-dir", str(run_dir),
            *extra]
    for item in (*SMALL, *SCHEDULE, "run.steps=100000", *sets):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.time() + 240
    while max(read_metrics(run_dir), default=0) < step:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.05)


def workers(proc: subprocess.Popen, count: int) -> list[psutil.Process]:
    """The launcher's train processes, ordered by --process-id."""
    found = psutil.Process(proc.pid).children()
    assert len(found) == count, found
    return sorted(found, key=lambda p: int(p.cmdline()[p.cmdline().index("--process-id") + 1]))


def test_four_processes_equal_one_stop_together_on_sigterm_and_resume_bitwise(
        tmp_path, small_recipe, launch):
    run = tmp_path / "run"
    proc = launch(run, 4, 8, sets=EVERY)
    wait_for_step(proc, run, 3)
    # One process only: the runtime's preemption sync must bring the other three to the same
    # step (each acting on its own would leave them waiting in the save's collectives).
    workers(proc, 4)[2].send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    ckpt = Checkpointer(run / "checkpoints", CheckpointConfig())
    saved = ckpt.latest_step()
    assert saved is not None and saved >= 3, out[-3000:]

    # Process 0 alone writes metrics (one record per step, none after the save) and prints the
    # progress lines; the others print no step lines.
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, saved + 1))
    assert not [x for x in out.splitlines() if x.startswith("[process") and "step " in x]
    assert f"saved checkpoint at step {saved}" in out
    events = read_events(run)
    assert [e["kind"] for e in events] == ["start", "preemption"]
    assert events[1]["step"] == saved and events[0]["processes"] == 4

    # Bitwise resume on the same 4 processes: set the preemption's checkpoint aside and train
    # again from the periodic one before it, `earlier`, to step `saved`. The steps between were
    # trained without interruption by the first launch, so a resume that restores any part of
    # the state, the data position or the rng inexactly differs in the losses or the state.
    earlier = max(s for s in ckpt.all_steps() if s < saved)
    ckpt.close()
    (tmp_path / "preempted").mkdir()
    (run / "checkpoints" / str(saved)).rename(tmp_path / "preempted" / str(saved))
    proc = launch(run, 4, 8, sets=(*EVERY, f"run.steps={saved}"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    resumed = read_metrics(run)
    for step in range(earlier + 1, saved + 1):
        for key in ("loss", "grad_norm"):
            assert resumed[step][key] == lines[step - 1][key], (step, key)
    program = build_program(small_recipe(*SCHEDULE))
    target = abstract_with_shardings(program.abstract_state, program.state_shardings)
    restored = []
    for directory in (tmp_path / "preempted", run / "checkpoints"):
        other = Checkpointer(directory, CheckpointConfig())
        restored.append(other.restore(saved, target)[:2])
        other.close()
    (state_a, data_a), (state_b, data_b) = restored
    assert data_a == data_b
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(a, b)

    # Against one process with all 8 devices. The runs differ only in how the 8 devices' partial
    # gradient and loss sums are associated (gloo's ring vs XLA:CPU's in-process all-reduce):
    # fp32 reassociation of 8 terms moves a sum by <= 7 * 2^-24 relative (4e-7) per reduction,
    # and Adam's normalised updates at lr <= 3e-3 keep it from growing over a few steps (seen:
    # 1e-7). A data-sharding error (two processes feeding the same rows) changes step 1's loss
    # by ~1e-2.
    reference = tmp_path / "reference"
    train(small_recipe(*SCHEDULE, f"run.steps={saved}"), reference)
    ref = read_metrics(reference)
    for step in range(1, saved + 1):
        np.testing.assert_allclose(resumed[step]["loss"], ref[step]["loss"], rtol=1e-5)
    assert [e["kind"] for e in read_events(run)][2:] == ["resume", "end"]


def test_sigkill_of_one_process_stops_the_others_within_a_minute(tmp_path, launch):
    # Two processes of one device: the smallest job with a survivor (start-up is most of it).
    run = tmp_path / "run"
    proc = launch(run, 2, 2, "--heartbeat-timeout", "10")
    wait_for_step(proc, run, 1)
    killed_at = time.monotonic()
    workers(proc, 2)[1].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=90)
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0 and elapsed < 60, (elapsed, out[-3000:])
    summary = out.splitlines()[-1]
    assert "process 1: killed by SIGKILL" in summary, out[-3000:]
    # The survivor failed too (it neither finished the 100000 steps nor exited cleanly).
    assert "process 0: killed by SIGABRT" in summary or "process 0: exit code 1" in summary
    assert "JAX distributed service detected fatal errors" in out


def test_nonfinite_loss_halts_every_process(tmp_path, launch):
    # lr 1e30 without clipping: step 1's update makes every later loss non-finite. The loss is a
    # replicated output of the step, so both processes see it at the same step and halt there
    # together; one acting alone would leave the other waiting in a collective.
    run = tmp_path / "run"
    proc = launch(run, 2, 2, sets=("optimizer.learning_rate=1e30", "optimizer.clip_norm=0",
                                   "schedule.warmup_steps=0", "checkpoint.every=1"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert "process 0: exit code 1, process 1: exit code 1" in out.splitlines()[-1], out[-3000:]
    halts = [x for x in out.splitlines() if "non-finite loss or gradient at step" in x]
    assert len(halts) == 1, out[-3000:]  # printed by process 0 only
    faults = [e for e in read_events(run) if e["kind"] == "fault"]
    assert len(faults) == 1 and faults[0]["policy"] == "halt"
    bad = faults[0]["step"]
    metrics = read_metrics(run)
    assert bad >= 2 and max(metrics, default=0) < bad
    assert all(np.isfinite(metrics[s]["loss"]) for s in metrics)
    steps = Checkpointer(run / "checkpoints", CheckpointConfig()).all_steps()
    assert steps and max(steps) < bad and faults[0]["last_checkpoint"] == max(steps)
