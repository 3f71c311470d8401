"""`data.mixture`: weights honoured, every source's rows read once per epoch, exact resume, eval
mixing, and the recipe syntax's messages."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from mnemax.errors import ConfigError, DataError
from mnemax.recipes.registry import load_recipe
from mnemax.trainer.data import DataConfig, eval_batches, open_sources, prepare, train_iterator

SEQ_LEN, BATCH = 8, 8


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """Two byte-tokenized sources whose rows are all distinct (random digits), A about 3x B."""
    root = tmp_path_factory.mktemp("mixture")
    rng = random.Random(0)
    dirs = []
    for name, docs in (("a", 60), ("b", 20)):
        lines = [json.dumps({"text": "".join(rng.choice("0123456789") for _ in range(40))})
                 for _ in range(docs)]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        prepare(str(root / f"{name}.jsonl"), "bytes", root / name, val_percent=20)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]


def row_owner(cfg: DataConfig, split: str) -> dict[bytes, tuple[int, int]]:
    """Each row's bytes -> (source, row index); asserts the rows of both sources are distinct."""
    owner = {}
    for k, (ds, _) in enumerate(open_sources(cfg, split)):
        for i, row in enumerate(ds.rows(np.arange(len(ds)))):
            owner[row.tobytes()] = (k, i)
    assert len(owner) == sum(len(ds) for ds, _ in open_sources(cfg, split))
    return owner


def test_mixture_weights_over_1000_batches(sources):
    a, b = sources
    cfg = DataConfig(mixture=f"{a}:7,{b}:3", seq_len=SEQ_LEN, global_batch=BATCH, seed=5)
    owner = row_owner(cfg, "train")
    it = train_iterator(cfg)
    picks = [owner[r.tobytes()] for _ in range(1000) for r in next(it)]
    n = len(picks)
    share_a = sum(k == 0 for k, _ in picks) / n
    # A sampler drawing each row from A with probability 0.7 has a binomial standard error of
    # sqrt(0.7 * 0.3 / 8000) = 0.0051; 4 of them (false alarm < 1e-4) bound any correct mixer.
    # grain's mix is a deterministic interleaving, within 1/n of 0.7, well inside this.
    assert abs(share_a - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n)
    # Within each source, rows come as whole shuffled epochs: counts differ by at most one.
    for k, (ds, _) in enumerate(open_sources(cfg, "train")):
        counts = np.bincount([i for s, i in picks if s == k], minlength=len(ds))
        assert counts.max() - counts.min() <= 1
        first_epoch = [i for s, i in picks if s == k][: len(ds)]
        assert sorted(first_epoch) == list(range(len(ds))) != first_epoch  # shuffled


def test_mixture_resume_is_exact(sources):
    a, b = sources
    cfg = DataConfig(mixture=f"{a}:0.6,{b}:0.4", seq_len=SEQ_LEN, global_batch=BATCH, seed=1)
    it = train_iterator(cfg)
    first = [next(it) for _ in range(40)]  # more than an epoch of B (40 * 8 * 0.4 rows)
    saved = json.loads(json.dumps(it.get_state()))
    assert saved["num_rows"] == [len(ds) for ds, _ in open_sources(cfg, "train")]
    after = np.stack([next(it) for _ in range(30)])
    resumed = train_iterator(cfg)
    resumed.set_state(saved)
    assert np.stack([next(resumed) for _ in range(30)]).tobytes() == after.tobytes()
    np.testing.assert_array_equal(next(train_iterator(cfg)), first[0])  # reproducible
    # Two processes resumed from the one-process state split the same global batch.
    halves = []
    for p in range(2):
        other = train_iterator(cfg, process_index=p, process_count=2)
        other.set_state(saved)
        halves.append(next(other))
    assert sorted(map(bytes, np.concatenate(halves))) == sorted(map(bytes, after[0]))
    reweighted = train_iterator(DataConfig(mixture=f"{a}:0.5,{b}:0.5", seq_len=SEQ_LEN,
                                           global_batch=BATCH, seed=1))
    with pytest.raises(DataError, match=r"weights \[0\.6, 0\.4\].*same data config"):
        reweighted.set_state(saved)


def test_mixture_eval_is_deterministic_and_weighted(sources):
    a, b = sources
    cfg = DataConfig(mixture=f"{a}:0.75,{b}:0.25", seq_len=SEQ_LEN, global_batch=BATCH)
    owner = row_owner(cfg, "val")
    batches = eval_batches(cfg, 10)
    np.testing.assert_array_equal(np.stack(batches), np.stack(eval_batches(cfg, 10)))
    picks = [owner[r.tobytes()] for r in np.concatenate(batches)]
    assert abs(sum(k == 0 for k, _ in picks) / len(picks) - 0.75) <= 1 / len(picks) + 1e-9
    val = [len(ds) for ds, _ in open_sources(cfg, "val")]
    for k in range(2):  # each source's val rows in order, cycled
        rows = [i for s, i in picks if s == k]
        assert rows == [j % val[k] for j in range(len(rows))]


def test_mixture_syntax_errors(sources):
    a, b = sources
    for bad, message in ((f"{a}:0.7,{b}", "is not SOURCE:WEIGHT"),
                         (f"{a}:-1", "positive weight"),
                         (f"{a}:x", "positive weight"),
                         (f"{a}:1,{a}:2", "names a source twice")):
        with pytest.raises(ConfigError, match=message) as e:
            load_recipe("tiny", [f"data.mixture={bad}"])
        assert "data.mixture" in str(e.value)
    recipe = load_recipe("tiny", [f"data.mixture={a}:2,{b}:1"])
    assert [w for _, w in open_sources(recipe.data, "train")] == pytest.approx([2 / 3, 1 / 3])


def test_mixture_refuses_different_tokenizers(sources, tmp_path):
    a, _ = sources
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"x": 0, "</s>": 1}, unk_token="x"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "x " * n}) + "\n"
                                              for n in range(5, 40)))
    prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "tokenizer.json"), tmp_path / "c")
    cfg = DataConfig(mixture=f"{a}:1,{tmp_path / 'c'}:1", seq_len=SEQ_LEN, global_batch=BATCH)
    with pytest.raises(DataError, match=r"different tokenizers.*same --tokenizer"):
        train_iterator(cfg)
