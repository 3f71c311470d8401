"""Defects that change what a run learns or reports without an error (issue 10): evaluation
cadence, the learning-rate schedule on resume, restore messages, the lr logged under
`nan_policy=skip`, MFU's device table and sliding-window FLOPs."""

import math

import jax
import numpy as np
import pytest

from mnemax.errors import CheckpointError
from mnemax.layers.components.attention import (
    mean_keys_attended,
    mean_keys_read,
    sliding_window_block,
)
from mnemax.layers.transformer import TransformerConfig
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.checkpoint import Checkpointer
from mnemax.trainer.hardware import peak_flops_for_kind
from mnemax.trainer.loop import train
from mnemax.trainer.setup import build_program
from tests.helpers import SMALL, read_metrics


def test_eval_runs_at_every_multiple_of_eval_every_and_at_the_last_step(tmp_path):
    """eval.every=3 with log_every=5: the old loop evaluated only on logged steps that were
    multiples of 3 (none of 1..7)."""
    recipe = load_recipe("tiny", [*SMALL, "run.steps=7", "run.log_every=5", "eval.every=3",
                                  "eval.batches=1"])
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    assert sorted(s for s, r in metrics.items() if "eval_loss" in r) == [3, 6, 7]
    assert sorted(s for s, r in metrics.items() if "loss" in r) == [5, 7]
    assert all(math.isfinite(metrics[s]["eval_loss"]) for s in (3, 6, 7))


def test_resume_with_more_steps_keeps_the_schedule_unless_decay_steps_is_given(tmp_path,
                                                                               capsys):
    """6 steps (warmup 2, cosine to 0.1 x peak at step 6), then resumed to 10: the lr must stay
    at the final value, not restart a cosine stretched over 10 steps (a jump up at step 7)."""
    base = [*SMALL, "schedule.warmup_steps=2", "optimizer.learning_rate=1e-3"]
    train(load_recipe("tiny", [*base, "run.steps=6"]), tmp_path)
    train(load_recipe("tiny", [*base, "run.steps=10"]), tmp_path)
    out = capsys.readouterr().out
    assert "keeping the checkpoint's learning-rate schedule: decay ends at step 6" in out
    lr = {s: r["lr"] for s, r in read_metrics(tmp_path).items()}
    # Logged lr of step s is the lr of its update: schedule(s - 1).
    assert lr[2] == pytest.approx(5e-4) and lr[3] == pytest.approx(1e-3)
    assert lr[6] > 1e-4 and all(lr[s] == pytest.approx(1e-4) for s in range(7, 11))

    # An explicit schedule.decay_steps is the user's choice: the new schedule is used.
    other = tmp_path / "explicit"
    train(load_recipe("tiny", [*base, "run.steps=6"]), other)
    train(load_recipe("tiny", [*base, "run.steps=10", "schedule.decay_steps=10"]), other)
    lr = {s: r["lr"] for s, r in read_metrics(other).items()}
    # Step 7's update: count 6, 4 steps into a cosine of 8 after the 2 warmup steps.
    cosine = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 4 / 8))
    assert lr[7] == pytest.approx(cosine, rel=1e-5) and lr[7] > lr[6]


@pytest.mark.parametrize(("change", "named"), [
    ("optimizer.clip_norm=0", "optimizer.clip_norm > 0: checkpoint True vs recipe False"),
    ("optimizer.moments_dtype=bfloat16",
     "optimizer.moments_dtype: checkpoint 'float32' vs recipe 'bfloat16'"),
])
def test_changed_optimizer_state_is_named_and_never_called_damaged(tmp_path, change, named):
    train(load_recipe("tiny", [*SMALL, "run.steps=1"]), tmp_path)
    with pytest.raises(CheckpointError) as err:
        train(load_recipe("tiny", [*SMALL, "run.steps=2", change]), tmp_path)
    assert named in str(err.value) and "damaged" not in str(err.value)
    assert "new --run-dir" in str(err.value)


def test_good_checkpoint_of_another_state_is_not_called_damaged(tmp_path):
    """Without the saved recipe to compare (an older checkpoint, a hand-made one), a restore
    into another tree reads the checkpoint's array metadata: other arrays -> a different
    state, named as such, with no advice to delete anything."""
    recipe = load_recipe("tiny", [*SMALL, "run.steps=1"])
    train(recipe, tmp_path)
    program = build_program(load_recipe("tiny", [*SMALL, "model.num_layers=3"]))
    from mnemax.trainer.checkpoint import abstract_with_shardings

    target = abstract_with_shardings(program.abstract_state, program.state_shardings)
    ckpt = Checkpointer(tmp_path / "checkpoints", recipe.checkpoint)
    with pytest.raises(CheckpointError, match="holds a different train state") as err:
        ckpt.restore(1, target)
    ckpt.close()
    message = str(err.value)
    assert "damaged" not in message and "Delete" not in message and "Move" not in message


def test_logged_lr_is_the_lr_of_the_next_applied_update_under_skip(tmp_path):
    """With nan_policy=skip, optax's count stops on skipped steps: the lr logged for step s is
    schedule(updates applied before s), not schedule(s - 1)."""
    recipe = load_recipe("tiny", [*SMALL, "optimizer.learning_rate=1e30",
                                  "optimizer.clip_norm=0", "schedule.warmup_steps=0",
                                  "run.steps=4", "run.nan_policy=skip"])
    assert train(recipe, tmp_path).status == "completed"
    metrics = read_metrics(tmp_path)
    schedule = build_program(recipe).schedule
    applied = 0
    for step in range(1, 5):
        assert metrics[step]["lr"] == pytest.approx(float(schedule(applied)), rel=1e-6)
        applied += int(metrics[step]["finite"])
    assert applied < 3  # some step was skipped, so the two counts differ


@pytest.mark.parametrize(("platform", "kind", "peak"), [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12), ("gpu", "NVIDIA L4", 121e12),
    ("gpu", "NVIDIA L40S", 362e12), ("gpu", "NVIDIA A100-SXM4-80GB", 312e12),
    ("gpu", "NVIDIA GH200 480GB", 989e12), ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5", 459e12), ("tpu", "TPU v4", 275e12), ("tpu", "TPU v6 lite", 918e12),
])
def test_peak_flops_match_device_kinds_exactly(platform, kind, peak):
    assert peak_flops_for_kind(platform, kind) == peak


def test_unknown_device_kind_has_no_peak():
    assert math.isnan(peak_flops_for_kind("gpu", "NVIDIA L40"))  # not L4, not L40S
    assert math.isnan(peak_flops_for_kind("tpu", "TPU v7x"))


def test_sliding_window_flops_count_the_key_blocks_each_query_block_reads():
    for seq_len, window in ((8, 3), (64, 16), (16, 16), (10, 32)):
        brute = np.mean([min(t + 1, window) for t in range(seq_len)])
        assert mean_keys_attended(seq_len, window) == pytest.approx(brute)
    assert mean_keys_attended(8) == pytest.approx(4.5)  # causal: (T + 1) / 2

    def blocks_read(seq_len, window, block):
        """Per query, the keys of every key block some query of its block sees a key of."""
        keys = []
        for q0 in range(0, seq_len, block):
            queries = range(q0, min(q0 + block, seq_len))
            seen = {b for q in queries
                    for b in range(max(0, q - window + 1) // block, q // block + 1)}
            keys += [sum(min(b * block + block, seq_len) - b * block for b in seen)] * len(
                queries)
        return np.mean(keys)

    for seq_len, window, block in ((2048, 700, 512), (1536, 512, 512), (1000, 100, 512),
                                   (384, 64, 128), (4096, 4096, 512)):
        assert mean_keys_read(seq_len, window, block) == pytest.approx(
            blocks_read(seq_len, window, block))
    assert sliding_window_block(2048) == 512 and sliding_window_block(384) == 128
    assert sliding_window_block(1000) == 512  # no splash block divides it: the XLA path's

    cfg = dict(num_layers=2, d_model=64, num_heads=4, vocab_size=320)
    full = TransformerConfig(**cfg, mixers=("attention",))
    swa = TransformerConfig(**cfg, mixers=("swa",), sliding_window=256)
    # Two layers, 4 heads of 16: 12 FLOPs per key per head dim (fwd + bwd) per layer. At 4,096
    # tokens in 512-blocks a query block reads its own key block and the one before (window 256).
    keys = np.mean([t + 1 for t in range(4096)]) - blocks_read(4096, 256, 512)
    assert full.flops_per_token(4096) - swa.flops_per_token(4096) == pytest.approx(
        2 * 12 * 4 * 16 * keys)
    # One block (64 tokens): every key is read, the square, not the causal half.
    short = TransformerConfig(**cfg, mixers=("swa",), sliding_window=16)
    assert short.flops_per_token(64) - full.flops_per_token(64) == pytest.approx(
        2 * 12 * 4 * 16 * (64 - 32.5))
    assert jax.device_count() == 8
