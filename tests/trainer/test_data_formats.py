"""`mnemax data prepare` inputs: txt, jsonl, parquet and saved HF datasets; bos/eos from the
tokenizer's config files; bad-input messages. (A short train on a prepared jsonl:
tests/trainer/test_train.py::test_prepare_then_train_and_eval_on_it.)"""

from __future__ import annotations

import hashlib
import json
import pathlib
import random

import numpy as np
import pytest

from mnemax.errors import DataError
from mnemax.launch.cli import main
from mnemax.trainer.data import load_tokenizer, prepare

tokenizers = pytest.importorskip("tokenizers")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
WORDS = ["alpha", "beta", "gamma", "delta", "memory", "layer", "héllo", "日本", "🙂", "key"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MNEMAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> pathlib.Path:
    """A byte-level BPE tokenizer.json with Llama 3's special tokens, and a tokenizer_config.json
    naming them (eos as a string, bos as a dict, as transformers writes both). `<|endoftext|>`,
    first in the fallback list, is in the vocabulary too: eos must come from the config."""
    directory = tmp_path_factory.mktemp("llama3")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", BOS, EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": BOS, "lstrip": False}, "eos_token": EOS}))
    return directory


def documents(n: int, seed: int = 0) -> list[str]:
    """`n` distinct random-word documents, some ending in a newline."""
    rng = random.Random(seed)

    def doc(i: int) -> str:
        words = [rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(rng.randrange(3, 30))]
        return " ".join(words) + ("\n" if i % 3 else "")

    return [doc(i) for i in range(n)]


def in_val(text: str, val_percent: float) -> bool:
    """The split rule, computed independently: sha256 of the UTF-8 text as a fraction."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64 < val_percent / 100


def decoded_docs(out: pathlib.Path, meta: dict, split: str, tok) -> list[str]:
    """A split's stream cut at bos: each piece must be [bos] + ids + [eos]; returns the texts."""
    files = meta["splits"][split]["files"]
    stream = np.concatenate([np.load(out / split / f["file"]) for f in files])
    starts = np.flatnonzero(stream == tok.bos_id)
    assert starts[0] == 0 and np.count_nonzero(stream == tok.eos_id) == len(starts)
    texts = []
    for doc in np.split(stream, starts[1:]):
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        assert tok.eos_id not in doc[:-1] and tok.bos_id not in doc[1:]
        texts.append(tok._tok.decode(doc[1:-1].tolist(), skip_special_tokens=False))
    return texts


def write_input(kind: str, root: pathlib.Path, texts: list[str]) -> tuple[str, str]:
    """Writes `texts` in format `kind` under `root`; returns (--input, --text-field)."""
    root.mkdir()
    if kind == "txt":
        for i, t in enumerate(texts):
            (root / f"d{i:03d}.txt").write_text(t, encoding="utf-8")
        return str(root / "*.txt"), "text"
    if kind == "jsonl":
        half = len(texts) // 2  # two files, with an extra field the reader must ignore
        for name, part in (("a.jsonl", texts[:half]), ("b.jsonl", texts[half:])):
            lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(part)]
            (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(root / "*.jsonl"), "body"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": list(range(len(texts))), "text": texts})
        pq.write_table(table, root / "c.parquet", row_group_size=7)
        return str(root / "c.parquet"), "text"
    import datasets

    datasets.Dataset.from_dict({"content": texts}).save_to_disk(str(root / "hf"))
    return str(root / "hf"), "content"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "hf"])
def test_format_round_trip(tmp_path, llama3_dir, kind):
    texts = documents(24, seed=len(kind))
    pattern, field = write_input(kind, tmp_path / "in", texts)
    tok = load_tokenizer(str(llama3_dir / "tokenizer.json"))
    assert tok.eos_id == tok._tok.token_to_id(EOS) != tok._tok.token_to_id("<|endoftext|>")
    assert tok.bos_id == tok._tok.token_to_id(BOS)
    meta = prepare(pattern, str(llama3_dir / "tokenizer.json"), tmp_path / "out",
                   val_percent=30, text_field=field, progress=False)
    assert (meta["bos_id"], meta["eos_id"]) == (tok.bos_id, tok.eos_id)
    # Records in input order (txt files sorted by name, jsonl a.jsonl then b.jsonl), each in
    # the split its text hash gives; prepare may write one document late (held back while the
    # other split was still empty, in case it had to move there).
    assert any(in_val(t, 30) for t in texts) and not all(in_val(t, 30) for t in texts)
    for split, val in (("train", False), ("val", True)):
        want = [t for t in texts if in_val(t, 30) == val]
        got = decoded_docs(tmp_path / "out", meta, split, tok)
        assert sorted(got) == sorted(want) and meta["splits"][split]["num_docs"] == len(want)
        assert any(got[:i] + got[i + 1:] == [t for t in want if t != got[i]]
                   for i in range(len(got))), "more than one document out of input order"


def test_special_tokens_map_and_workers(tmp_path, llama3_dir):
    """special_tokens_map.json alone names bos/eos too; 2 workers write the same bytes as 1."""
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))
    tok = load_tokenizer(str(directory / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id) == (tok._tok.token_to_id(EOS), None)
    texts = documents(300)
    pattern, _ = write_input("jsonl", tmp_path / "in", texts)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare(pattern, str(directory / "tokenizer.json"), out, text_field="body",
                workers=workers, progress=False)
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert outs[0] == outs[1]


def test_single_jsonl_file_splits(tmp_path):
    """A single file (one jsonl) splits per record; val gets a document even when no hash falls
    under val_percent (the lowest-hash one is moved there)."""
    texts = documents(10)
    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    meta = prepare(str(path), "bytes", tmp_path / "out", val_percent=0)
    lowest = min(texts, key=lambda t: hashlib.sha256(t.encode()).digest()[:8])
    val = np.load(tmp_path / "out" / "val" / "tokens_00000.npy")
    assert val[-1] == 256 and bytes(val[:-1].astype(np.uint8)).decode() == lowest
    assert (meta["splits"]["train"]["num_docs"], meta["splits"]["val"]["num_docs"]) == (9, 1)


# ------------------------------------------------------------------------------- bad input


def assert_nothing_written(tmp_path: pathlib.Path, out: pathlib.Path) -> None:
    assert not out.exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # the half-written tmp dir is gone


def test_error_unknown_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    with pytest.raises(DataError, match="has no field 'text'") as e:
        prepare(str(path), "bytes", tmp_path / "out")
    assert str(path) in str(e.value) and "body" in str(e.value) and "--text-field" in str(e.value)
    assert_nothing_written(tmp_path, tmp_path / "out")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet has no field 'txt'.*--text-field"):
        prepare(str(tmp_path / "c.parquet"), "bytes", tmp_path / "out", text_field="txt")


@pytest.mark.parametrize("name", ["b.txt", "b.jsonl"])
def test_error_empty_file(tmp_path, name):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "c.txt").write_text("more text")
    (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"is empty|holds no records") as e:
        prepare(str(tmp_path / "*"), "bytes", tmp_path / "out")
    assert str(tmp_path / name) in str(e.value) and "remove it" in str(e.value)
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_error_tokenizer_without_eos(tmp_path, llama3_dir):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    # A config that names no eos: the fallback list (<|endoftext|> is in the vocab) is not used.
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS}))
    (tmp_path / "a.txt").write_text("text one")
    (tmp_path / "b.txt").write_text("text two")
    with pytest.raises(DataError, match="no end-of-document token") as e:
        prepare(str(tmp_path / "*.txt"), str(directory / "tokenizer.json"), tmp_path / "out")
    assert str(directory / "tokenizer.json") in str(e.value)
    assert "tokenizer_config.json" in str(e.value) and "eos_token" in str(e.value)
    assert_nothing_written(tmp_path, tmp_path / "out")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=r"'<\|nope\|>' .* not in the tokenizer's vocabulary"):
        load_tokenizer(str(directory / "tokenizer.json"))


def test_error_non_utf8(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"record 2 of .*c\.jsonl is not valid UTF-8") as e:
        prepare(str(path), "bytes", tmp_path / "out")
    assert "--encoding-errors replace" in str(e.value)
    assert_nothing_written(tmp_path, tmp_path / "out")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_bytes(b"ok")
    (tmp_path / "t" / "b.txt").write_bytes(b"\xff\xfe latin")
    assert main(["data", "prepare", "--input", str(tmp_path / "t" / "*.txt"),
                 "--out", str(tmp_path / "out")]) == 2
    with pytest.raises(DataError, match=r"b\.txt is not valid UTF-8.*--encoding-errors replace"):
        prepare(str(tmp_path / "t" / "*.txt"), "bytes", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")
    meta = prepare(str(path), "bytes", tmp_path / "out", encoding_errors="replace")
    streams = [np.load(tmp_path / "out" / s / "tokens_00000.npy") for s in ("train", "val")]
    assert "caf\ufffd".encode() in b"".join(bytes(s.astype(np.uint8)) for s in streams)
    assert meta["splits"]["train"]["num_docs"] + meta["splits"]["val"]["num_docs"] == 3


def test_error_missing_path_and_single_document(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["data", "prepare", "--input", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"input {str(missing)!r} does not exist" in err and "Traceback" not in err
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match=r"holds 1 document.*at least 2"):
        prepare(str(tmp_path / "one.txt"), "bytes", tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")

