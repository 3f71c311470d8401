"""Prepare a text corpus as token shards: `out_dir/{train,val}/shard_NNNNN.npy` + `metadata.json`.

Each text file is one document. Files are split into train/val by a stable hash of their path
relative to the corpus root (so the split is the same on every machine), tokenized, followed by
eos, concatenated in sorted path order and cut into rows of `seq_len + 1` tokens with stride
`seq_len`: consecutive rows share one boundary token, so every token after the first is a target
exactly once. The trailing partial row is dropped. Shards are `[rows, seq_len + 1]` arrays of
uint16 (vocab_size <= 65536) or uint32.

The dataset is written into a hidden sibling directory and renamed into place at the end, so a
crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Sequence

import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_FILES_PER_ENCODE = 256  # Files read and tokenized together (bounds memory, feeds encode_many).


def resolve_inputs(
    inputs: str | Sequence[str | os.PathLike],
) -> tuple[list[pathlib.Path], pathlib.Path]:
    """Expands a glob (`**` allowed) or a list of paths into (files sorted by relative path, root).

    The root is the deepest directory containing every file; relative paths are taken from it.
    """
    if isinstance(inputs, (str, os.PathLike)):
        pattern = os.path.expanduser(str(inputs))
        paths = [pathlib.Path(p) for p in glob.glob(pattern, recursive=True)]
        what = f"the glob {str(inputs)!r}"
    else:
        paths = [pathlib.Path(p).expanduser() for p in inputs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} input file(s) do not exist, e.g. {missing[0]}: pass existing "
                "text files, or a glob such as 'corpus/**/*.txt'."
            )
        what = "the input list"
    files = sorted({p.resolve() for p in paths if p.is_file()})
    if not files:
        raise DataError(
            f"{what} matches no files: check the path (quote the glob so the shell does not "
            "expand it, and use '**' to match subdirectories, e.g. 'corpus/**/*.txt')."
        )
    root = pathlib.Path(os.path.commonpath([str(f.parent) for f in files]))
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    return files, root


def split_is_val(rel_paths: Sequence[str], val_percent: float) -> list[bool]:
    """For each relative path, whether it is held out for validation.

    A file is in val when the sha256 of its path, read as a fraction in [0, 1), is below
    `val_percent / 100`. With >= 2 files each split gets at least one: the lowest-hash file is
    moved to val, or the highest-hash file to train.
    """
    scores = [
        int.from_bytes(hashlib.sha256(p.encode("utf-8")).digest()[:8], "big") / 2**64
        for p in rel_paths
    ]
    is_val = [s < val_percent / 100 for s in scores]
    if len(rel_paths) >= 2:
        if not any(is_val):
            is_val[min(range(len(scores)), key=scores.__getitem__)] = True
        if all(is_val):
            is_val[max(range(len(scores)), key=scores.__getitem__)] = False
    return is_val


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _ShardWriter:
    """Cuts a token stream into rows `[seq_len + 1]` (stride seq_len) and writes shards."""

    def __init__(self, directory: pathlib.Path, seq_len: int, shard_rows: int, dtype: np.dtype):
        self.directory, self.seq_len, self.shard_rows, self.dtype = (
            directory,
            seq_len,
            shard_rows,
            dtype,
        )
        directory.mkdir(parents=True)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.num_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        """Appends a 1-D token array to the stream; writes every full shard."""
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._pending_len += len(tokens)
        self.num_tokens += len(tokens)
        shard_tokens = self.shard_rows * self.seq_len
        if self._pending_len < shard_tokens + 1:
            return
        stream = np.concatenate(self._pending)
        start = 0
        while len(stream) - start >= shard_tokens + 1:
            self._write(stream[start : start + shard_tokens + 1])
            start += shard_tokens  # The last token of this shard starts the next one.
        self._pending = [stream[start:]]
        self._pending_len = len(stream) - start

    def finish(self) -> int:
        """Writes the last (smaller) shard; returns the total number of rows."""
        stream = np.concatenate(self._pending) if self._pending else np.zeros(0, self.dtype)
        rows = max(0, (len(stream) - 1) // self.seq_len)
        if rows:
            self._write(stream[: rows * self.seq_len + 1])
        return sum(s["rows"] for s in self.shards)

    def _write(self, stream: np.ndarray) -> None:
        rows = np.lib.stride_tricks.sliding_window_view(stream, self.seq_len + 1)[:: self.seq_len]
        name = f"shard_{len(self.shards):05d}.npy"
        np.save(self.directory / name, np.ascontiguousarray(rows))
        self.shards.append({"file": name, "rows": int(rows.shape[0])})


def _write_split(
    files: Sequence[pathlib.Path],
    directory: pathlib.Path,
    tok: Tokenizer,
    seq_len: int,
    shard_rows: int,
) -> dict:
    writer = _ShardWriter(directory, seq_len, shard_rows, token_dtype(tok.vocab_size))
    eos = np.array([tok.eos_id], dtype=np.uint32)
    for i in range(0, len(files), _FILES_PER_ENCODE):
        chunk = files[i : i + _FILES_PER_ENCODE]
        # errors="replace": a few stdlib test files are deliberately not UTF-8.
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in chunk]
        for ids in tok.encode_many(texts):
            if len(ids) and int(ids.max()) >= tok.vocab_size:
                raise DataError(
                    f"tokenizer {tok.name} produced id {int(ids.max())} >= its vocab_size "
                    f"{tok.vocab_size}: the tokenizer.json is inconsistent; re-save it."
                )
            writer.add(ids)
            writer.add(eos)
    num_rows = writer.finish()
    return {
        "num_files": len(files),
        "num_tokens": writer.num_tokens,
        "num_rows": num_rows,
        "shards": writer.shards,
    }


def _check_params(seq_len: int, val_percent: float, shard_rows: int) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len}: pass e.g. 256.")
    if not 0 <= val_percent < 100:
        raise DataError(
            f"val_percent must be in [0, 100), got {val_percent}: pass e.g. 2.0 (percent of "
            "files held out for validation)."
        )
    if shard_rows < 1:
        raise DataError(f"shard_rows must be a positive integer, got {shard_rows}.")


def _is_nonempty_dir(path: pathlib.Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def write_dataset(
    files: Sequence[pathlib.Path],
    root: pathlib.Path,
    *,
    tokenizer: str,
    seq_len: int,
    out_dir: str | os.PathLike,
    val_percent: float,
    shard_rows: int,
    source: str,
) -> tuple[dict, bool]:
    """Writes `files` as a prepared dataset in `out_dir`, atomically.

    Returns (metadata, True) when this call published `out_dir`, or (the metadata found there,
    False) when another process published it first; in both cases `out_dir` is complete.
    """
    _check_params(seq_len, val_percent, shard_rows)
    out = pathlib.Path(out_dir).expanduser().resolve()
    tok = load_tokenizer(tokenizer)
    rel = [f.relative_to(root).as_posix() for f in files]
    if len(files) < 2:
        raise DataError(
            f"found only {len(files)} input file ({rel[0] if rel else ''}): prepare holds out "
            "whole files for validation, so it needs at least 2 files; split the text into "
            "several files."
        )
    is_val = split_is_val(rel, val_percent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        splits = {}
        for split in SPLITS:
            chosen = [i for i in range(len(files)) if is_val[i] == (split == "val")]
            info = _write_split([files[i] for i in chosen], tmp / split, tok, seq_len, shard_rows)
            if info["num_rows"] == 0:
                raise DataError(
                    f"the {split} split of {source} has {info['num_tokens']} tokens from "
                    f"{info['num_files']} file(s), fewer than one row of seq_len + 1 = "
                    f"{seq_len + 1} tokens: the corpus is too small for seq_len {seq_len}; add "
                    "more text or lower --seq-len."
                )
            splits[split] = {**info, "files": [rel[i] for i in chosen]}
        metadata = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {"name": tok.name, "spec": tokenizer},
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "seq_len": seq_len,
            "dtype": token_dtype(tok.vocab_size).name,
            "val_percent": val_percent,
            "source": source,
            "splits": splits,
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
        try:
            os.rename(tmp, out)  # Atomic; replaces out only if it is an empty directory.
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not (out / "metadata.json").is_file():
                raise DataError(
                    f"{out} exists, is not empty and has no metadata.json, so it is not a "
                    f"prepared dataset: delete {out} (or move it away) and run again."
                ) from e
            return json.loads((out / "metadata.json").read_text()), False
        return metadata, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(
    input_glob: str | Sequence[str | os.PathLike],
    tokenizer: str,
    seq_len: int,
    out_dir: str | os.PathLike,
    *,
    val_percent: float = 2.0,
    shard_rows: int = 65536,
) -> dict:
    """Tokenizes text files into `out_dir/{train,val}/shard_*.npy` and returns the metadata.

    Args:
      input_glob: a glob such as 'corpus/**/*.txt' or a list of file paths; one file = one
        document.
      tokenizer: "bytes" or a path to a tokenizer.json.
      seq_len: tokens per training sequence; rows are `seq_len + 1` tokens.
      out_dir: where to write; must not exist or be empty.
      val_percent: percent of files held out for validation (by a hash of their path).
      shard_rows: rows per shard file.
    """
    out = pathlib.Path(out_dir).expanduser()
    if _is_nonempty_dir(out):
        raise DataError(
            f"output directory {out} already exists and is not empty: pass another --out "
            f"directory, or delete {out} first if you want to rebuild it."
        )
    files, root = resolve_inputs(input_glob)
    source = str(input_glob) if isinstance(input_glob, (str, os.PathLike)) else str(root)
    metadata, created = write_dataset(
        files,
        root,
        tokenizer=tokenizer,
        seq_len=seq_len,
        out_dir=out,
        val_percent=val_percent,
        shard_rows=shard_rows,
        source=source,
    )
    if not created:
        raise DataError(
            f"output directory {out} was created by another process while this one was "
            "preparing: pass another --out directory, or delete it and run prepare again."
        )
    return metadata
