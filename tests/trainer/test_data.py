"""Tests of mnemax.trainer.data: tokenizers, prepare, packed token streams, train and eval batches.

Input formats, bos/eos and bad-input messages: test_data_formats.py; mixtures:
test_data_mixture.py.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random
import sys
import sysconfig
import time

import numpy as np
import pytest

from mnemax.errors import DataError
from mnemax.trainer.data import (
    ByteTokenizer,
    DataConfig,
    JsonTokenizer,
    eval_batches,
    load_tokenizer,
    open_dataset,
    prepare,
    stdlib_corpus_files,
    train_iterator,
)
from mnemax.trainer.data.prepare import write_dataset
from mnemax.trainer.data.sources import resolve_inputs

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "héllo",
    "wörld",
    "日本",
    "🙂",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Keeps every test off ~/.cache."""
    monkeypatch.setenv("MNEMAX_CACHE", str(tmp_path / "cache"))


def write_corpus(root: pathlib.Path, num_files: int, words_per_file: int, seed: int = 0) -> dict:
    """Writes `num_files` random-word text files in nested dirs; returns {relative path: text}."""
    rng = random.Random(seed)
    texts = {}
    for i in range(num_files):
        rel = f"part{i % 3}/sub/doc{i:03d}.txt" if i % 2 else f"part{i % 3}/doc{i:03d}.txt"
        text = (
            " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words_per_file))
            + f"\n#{i}\n"
        )
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        texts[rel] = text
    return texts


def prepared(tmp_path, *, num_files=12, words=60, shard_tokens=7 * 16, seed=0):
    """Prepares a small byte-tokenized corpus; returns (out_dir, metadata, texts)."""
    texts = write_corpus(tmp_path / "corpus", num_files, words, seed)
    out = tmp_path / f"prepared-{seed}"
    meta = prepare(
        str(tmp_path / "corpus" / "**" / "*.txt"),
        "bytes",
        out,
        val_percent=20.0,
        shard_tokens=shard_tokens,
    )
    return out, meta, texts


def stream_of(out: pathlib.Path, meta: dict, split: str) -> np.ndarray:
    """A split's token stream, read with numpy alone (the reference for TokenDataset)."""
    files = meta["splits"][split]["files"]
    return np.concatenate([np.load(out / split / f["file"]) for f in files])


def row_ids(dataset) -> dict[bytes, int]:
    """Maps each row's bytes to its index; asserts rows are unique so ids identify rows."""
    ids = {dataset[i].tobytes(): i for i in range(len(dataset))}
    assert len(ids) == len(dataset)
    return ids


# ---------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "bytes")
    for text in ["hello, world\n", "héllo wörld — 日本語 🙂", ""]:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_id]) == text  # eos is dropped
        np.testing.assert_array_equal(tok.encode_many([text])[0], ids)
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte char is replaced, not raised


@pytest.mark.parametrize("with_eos", [True, False])
def test_json_tokenizer_round_trip(tmp_path, with_eos):
    """A bare tokenizer.json (no config beside it): eos from the fallback list, else an error."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"] if with_eos else [],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    if not with_eos:
        with pytest.raises(DataError, match="no end-of-document token") as e:
            load_tokenizer(str(path))
        assert str(path) in str(e.value) and "tokenizer_config.json" in str(e.value)
        return
    loaded = load_tokenizer(str(path))
    assert isinstance(loaded, JsonTokenizer)
    assert loaded.eos_id == tok.token_to_id("<|endoftext|>") and loaded.bos_id is None
    assert loaded.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    text = "alpha héllo 日本 🙂 gamma\n  unseen-words 123"
    ids = loaded.encode(text)
    assert max(ids) < loaded.vocab_size
    assert loaded.decode(ids) == text
    assert loaded.decode([*ids, loaded.eos_id]) == text
    np.testing.assert_array_equal(loaded.encode_many([text])[0], ids)


def test_load_tokenizer_missing_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer=bytes"):
        load_tokenizer(str(tmp_path / "nope.json"))


# -------------------------------------------------------------------------------------- prepare


def test_prepare_round_trip(tmp_path):
    out, meta, texts = prepared(tmp_path, shard_tokens=100)
    tok = ByteTokenizer()
    assert meta == json.loads((out / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["dtype"] == "uint16" and "seq_len" not in meta
    docs = {}
    for split in ("train", "val"):
        info = meta["splits"][split]
        arrays = [np.load(out / split / f["file"]) for f in info["files"]]
        assert all(a.dtype == np.uint16 and a.ndim == 1 for a in arrays)
        # Files are shard_tokens long but the last.
        assert [len(a) for a in arrays[:-1]] == [100] * (len(arrays) - 1) and len(arrays) > 1
        stream = np.concatenate(arrays)
        assert len(stream) == info["num_tokens"] and stream[-1] == tok.eos_id
        # Documents are the text's bytes + eos, in sorted path order (none held back: val is
        # non-empty by the hash rule, asserted below).
        decoded = [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == 256) + 1)[:-1]]
        assert len(decoded) == info["num_docs"]
        docs[split] = decoded
    # Each document in exactly one split, by sha256 of its text (computed here independently).
    in_val = {t: int(hashlib.sha256(t.encode()).hexdigest()[:16], 16) / 2**64 < 0.2
              for t in texts.values()}
    assert 0 < sum(in_val.values()) < len(texts)
    for split, want_val in (("train", False), ("val", True)):
        assert docs[split] == [texts[r] for r in sorted(texts) if in_val[texts[r]] == want_val]


def test_packing_at_two_seq_lens(tmp_path):
    """One prepared dataset serves any seq_len: row k = stream[k*L : k*L + L + 1], rows cross
    file boundaries, and every token after the first is a target exactly once."""
    out, meta, _ = prepared(tmp_path, words=40, shard_tokens=37)
    stream = stream_of(out, meta, "train")
    for seq_len in (8, 13):
        ds = open_dataset(DataConfig(source=str(out), seq_len=seq_len), "train")
        n = (len(stream) - 1) // seq_len
        assert (len(ds), ds.seq_len, ds.vocab_size, ds.eos_id) == (n, seq_len, 257, 256)
        rows = ds.rows(np.arange(n))
        assert rows.dtype == np.int32 and rows.shape == (n, seq_len + 1)
        want = np.stack([stream[k * seq_len: k * seq_len + seq_len + 1] for k in range(n)])
        np.testing.assert_array_equal(rows, want)
        np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
        np.testing.assert_array_equal(np.concatenate([rows[0], rows[1:, 1:].ravel()]),
                                      stream[: n * seq_len + 1])
        np.testing.assert_array_equal(ds[n - 1], want[-1])
        np.testing.assert_array_equal(ds.rows(np.array([3, 0, 3])), want[[3, 0, 3]])
        batch = next(train_iterator(DataConfig(source=str(out), seq_len=seq_len,
                                               global_batch=4)))
        assert batch.shape == (4, seq_len + 1)


def test_prepare_split_is_machine_independent(tmp_path):
    texts_a = write_corpus(tmp_path / "a", 30, 20)
    write_corpus(tmp_path / "b" / "nested", 30, 20)
    meta_a = prepare(str(tmp_path / "a" / "**" / "*.txt"), "bytes", tmp_path / "oa")
    meta_b = prepare(sorted((tmp_path / "b").rglob("*.txt")), "bytes", tmp_path / "ob")
    for split in ("train", "val"):
        np.testing.assert_array_equal(stream_of(tmp_path / "oa", meta_a, split),
                                      stream_of(tmp_path / "ob", meta_b, split))
    assert meta_a["splits"]["val"]["num_docs"] >= 1
    num_docs = meta_a["splits"]["train"]["num_docs"] + meta_a["splits"]["val"]["num_docs"]
    assert num_docs == len(texts_a)


def test_publish_race_uses_winner(tmp_path):
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    for i, f in enumerate(files):
        f.write_text(f"document {i} " * 20)
    sources = resolve_inputs(files)
    kwargs = dict(tokenizer="bytes", out_dir=tmp_path / "out", val_percent=2.0, source="test")
    meta1, created1 = write_dataset(sources, **kwargs)
    meta2, created2 = write_dataset(sources, **kwargs)
    assert (created1, created2) == (True, False)
    assert meta1 == meta2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # loser cleaned up


# ---------------------------------------------------------------------------------- iterators


def collect(it, n: int) -> np.ndarray:
    return np.stack([next(it) for _ in range(n)])


@pytest.mark.parametrize("words", [400, 5])  # 40: 12 batches of 4 span more than one epoch
def test_train_iterator_resume_bitwise(tmp_path, words):
    out, _, _ = prepared(tmp_path, words=words)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=4, seed=3)
    num_rows = len(open_dataset(cfg, "train"))
    assert (num_rows < 12 * 4) == (words == 5)

    it = train_iterator(cfg)
    first = collect(it, 7)
    assert first.shape == (7, 4, 17) and first.dtype == np.int32
    saved = json.loads(json.dumps(it.get_state()))  # survives a JSON checkpoint
    a = collect(it, 5)
    resumed = train_iterator(cfg)
    resumed.set_state(saved)
    b = collect(resumed, 5)
    assert a.tobytes() == b.tobytes()
    # Same config, fresh iterator: the whole sequence is reproducible.
    np.testing.assert_array_equal(collect(train_iterator(cfg), 7), first)


def test_train_iterator_reshuffles_each_epoch(tmp_path):
    out, _, _ = prepared(tmp_path, words=5)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=4)
    ids = row_ids(open_dataset(cfg, "train"))
    n = len(ids)
    stream = collect(train_iterator(cfg), (3 * n) // 4 + 1).reshape(-1, 17)
    order = [ids[r.tobytes()] for r in stream]
    epoch1, epoch2 = order[:n], order[n : 2 * n]
    assert sorted(epoch1) == sorted(epoch2) == list(range(n))  # every row once per epoch
    assert epoch1 != epoch2 and epoch1 != list(range(n))


def test_train_iterator_process_sharding(tmp_path):
    out, _, _ = prepared(tmp_path, words=200)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=4, seed=1)
    ids = row_ids(open_dataset(cfg, "train"))
    steps = len(ids) // 4  # one epoch of whole batches
    single = collect(train_iterator(cfg), steps)
    p0 = collect(train_iterator(cfg, process_index=0, process_count=2), steps)
    p1 = collect(train_iterator(cfg, process_index=1, process_count=2), steps)
    assert p0.shape == p1.shape == (steps, 2, 17)

    def rows_of(batches):
        return [ids[r.tobytes()] for r in batches.reshape(-1, 17)]

    assert not set(rows_of(p0)) & set(rows_of(p1))
    assert sorted(rows_of(p0) + rows_of(p1)) == sorted(rows_of(single))
    assert len(set(rows_of(single))) == steps * 4  # an epoch has no repeats
    for k in range(steps):  # each global batch is the same set whatever the process count
        assert sorted(rows_of(p0[k]) + rows_of(p1[k])) == sorted(rows_of(single[k]))

    # A position saved with one process resumes on two processes at the same global batch.
    it = train_iterator(cfg)
    collect(it, 3)
    state, after = it.get_state(), next(it)
    halves = []
    for p in range(2):
        resumed = train_iterator(cfg, process_index=p, process_count=2)
        resumed.set_state(state)
        halves.append(next(resumed))
    assert sorted(rows_of(np.concatenate(halves))) == sorted(rows_of(after))


def test_eval_batches_in_order_and_cycled(tmp_path):
    out, _, _ = prepared(tmp_path, words=100)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=4)
    val = open_dataset(cfg, "val")
    n = len(val)
    big = DataConfig(source=str(out), seq_len=16, global_batch=n + 3)  # > one batch of val rows
    for c, num in [(cfg, n // 4 + 2), (big, 2)]:
        batches = eval_batches(c, num)
        assert len(batches) == num
        flat = np.concatenate(batches)
        assert flat.shape == (num * c.global_batch, 17) and flat.dtype == np.int32
        for i in range(len(flat)):
            np.testing.assert_array_equal(flat[i], val[i % n])
    # Two processes split each batch and together give the one-process batch.
    one = eval_batches(cfg, 3)
    two = [eval_batches(cfg, 3, process_index=p, process_count=2) for p in range(2)]
    for k in range(3):
        merged = np.empty_like(one[k])
        merged[0::2], merged[1::2] = two[0][k], two[1][k]
        np.testing.assert_array_equal(merged, one[k])


# ------------------------------------------------------------------------------------- errors


def test_error_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        open_dataset(DataConfig(source=str(missing)), "train")
    assert str(missing) in str(e.value) and "mnemax data prepare" in str(e.value)
    assert "data.source=stdlib" in str(e.value)


def test_error_dir_without_metadata(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"no metadata\.json") as e:
        open_dataset(DataConfig(source=str(tmp_path / "half")), "train")
    assert "mnemax data prepare" in str(e.value)


def test_error_format_version_1(tmp_path):
    """Datasets of the old format (rows of a fixed seq_len) are refused with 'prepare again'."""
    old = tmp_path / "old"
    (old / "train").mkdir(parents=True)
    rows = np.arange(3 * 17, dtype=np.uint16).reshape(3, 17)
    np.save(old / "train" / "shard_00000.npy", rows)
    split = {"num_rows": 3, "shards": [{"file": "shard_00000.npy", "rows": 3}]}
    (old / "metadata.json").write_text(json.dumps({
        "format_version": 1, "seq_len": 16, "vocab_size": 257, "eos_id": 256,
        "splits": {"train": split, "val": split}}))
    with pytest.raises(DataError, match="format_version 1") as e:
        open_dataset(DataConfig(source=str(old), seq_len=16), "train")
    msg = str(e.value)
    assert str(old) in msg and "seq_len 16" in msg and "prepare the corpus again" in msg
    assert "mnemax data prepare" in msg


def test_error_unknown_split(tmp_path):
    out, _, _ = prepared(tmp_path)
    with pytest.raises(DataError, match="'test'"):
        open_dataset(DataConfig(source=str(out), seq_len=16), "test")


def test_error_glob_matches_nothing(tmp_path):
    pattern = str(tmp_path / "empty" / "**" / "*.txt")
    with pytest.raises(DataError, match="matches no files") as e:
        prepare(pattern, "bytes", tmp_path / "out")
    assert pattern in str(e.value) and "quote the glob" in str(e.value)


def test_error_nonempty_out_dir(tmp_path):
    write_corpus(tmp_path / "corpus", 4, 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty") as e:
        prepare(str(tmp_path / "corpus" / "**" / "*.txt"), "bytes", out)
    assert str(out) in str(e.value) and "another --out" in str(e.value)
    assert "delete" in str(e.value)
    assert (out / "keep.txt").read_text() == "mine"


def test_error_corpus_too_small_for_seq_len(tmp_path):
    out, _, _ = prepared(tmp_path, words=5)
    cfg = DataConfig(source=str(out), seq_len=4096, global_batch=4)
    with pytest.raises(DataError, match="has 0 rows of seq_len 4096") as e:
        train_iterator(cfg)
    assert "data.seq_len" in str(e.value)
    with pytest.raises(DataError, match="less than one row") as e:
        eval_batches(cfg, 1)
    assert "lower data.seq_len" in str(e.value)


def test_error_global_batch_not_divisible(tmp_path):
    out, _, _ = prepared(tmp_path)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=6)
    with pytest.raises(DataError, match="global_batch=6") as e:
        train_iterator(cfg, process_index=0, process_count=4)
    assert "process count 4" in str(e.value) and "multiple of 4" in str(e.value)
    with pytest.raises(DataError, match="global_batch=6"):
        eval_batches(cfg, 1, process_index=0, process_count=4)


def test_error_train_smaller_than_batch(tmp_path):
    out, _, _ = prepared(tmp_path, words=5)
    rows = len(open_dataset(DataConfig(source=str(out), seq_len=16), "train"))
    with pytest.raises(DataError, match=f"has {rows} rows of seq_len 16, fewer than one batch"):
        train_iterator(DataConfig(source=str(out), seq_len=16, global_batch=rows + 1))


def test_error_resume_with_other_seed(tmp_path):
    out, _, _ = prepared(tmp_path)
    cfg = DataConfig(source=str(out), seq_len=16, global_batch=4)
    state = train_iterator(cfg).get_state()
    other = train_iterator(DataConfig(source=str(out), seq_len=16, global_batch=4, seed=9))
    with pytest.raises(DataError, match="seed 0") as e:
        other.set_state(state)
    assert "data.seed=9" in str(e.value)


# -------------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_files():
    files = stdlib_corpus_files()
    assert len(files) > 500
    assert all(f.suffix in (".py", ".txt", ".rst") for f in files)
    banned = {"site-packages", "dist-packages", "__pycache__"}
    assert not any(banned & set(f.parts) for f in files)
    assert any(f.name == "os.py" for f in files)
    root = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert files == sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _dataset_digest(directory: pathlib.Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_stdlib_dataset_builds_deterministically(tmp_path, monkeypatch):
    cfg = DataConfig(seq_len=128, global_batch=8)
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv("MNEMAX_CACHE", str(tmp_path / run))
        start = time.perf_counter()
        train = open_dataset(cfg, "train")
        elapsed = time.perf_counter() - start
        assert elapsed < 30, f"building the stdlib corpus took {elapsed:.1f}s"
        val = open_dataset(cfg, "val")
        py = f"py{sys.version_info.major}.{sys.version_info.minor}"
        assert train.directory.name == f"stdlib-{py}-bytes-v2.0-f2"  # no seq_len in the name
        assert train.metadata["splits"]["train"]["num_tokens"] > 1_000_000
        assert len(val) > 0
        digests.append(_dataset_digest(train.directory))
    assert digests[0] == digests[1]
    batch = next(train_iterator(cfg))
    assert batch.shape == (8, 129) and batch.max() <= 256
