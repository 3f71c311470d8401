"""Prepare a corpus as unpacked token streams: `out_dir/{train,val}/tokens_NNNNN.npy` + metadata.

Each document (a text file, a JSON line, a Parquet or Hugging Face dataset row; see `sources`)
is tokenized as `[bos] + tokens + [eos]` (`bos` only when the tokenizer has one) and appended to
its split's stream, in input order. A split's stream is stored as 1-D uint16 (vocab_size <=
65536) or uint32 arrays of up to `shard_tokens` tokens each; their concatenation is the stream.
No sequence length is fixed here: `shards.TokenDataset` cuts rows when training starts.

The validation split is chosen per document by a stable hash of its text: a document is in val
when sha256(text), read as a fraction in [0, 1), is below `val_percent / 100`. The text, rather
than the file path and record index, so that the split does not depend on how the corpus is cut
into files or named, is the same on every machine, and exact duplicates of a document never
straddle train and val. With >= 2 documents each split gets at least one: while one split is
still empty, the document that would move there (lowest hash for val, highest for train) is
held back and moved at the end if it is still needed.

Tokenization runs in `workers` processes over chunks of documents; the dataset is written into
a hidden sibling directory and renamed into place at the end, so a crash or a bad input never
leaves a directory that looks complete.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.sources import EncodingErrors, Source, read_records, resolve_inputs
from mnemax.trainer.data.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 2
SPLITS = ("train", "val")
_CHUNK_DOCS = 256  # Documents per tokenizer call (and per task sent to a worker).
_CHUNK_BYTES = 4 << 20  # ... or fewer, once their text reaches 4 MiB.


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def text_score(text: str) -> float:
    """sha256 of the UTF-8 text as a fraction in [0, 1): the document is in val when it is
    below val_percent / 100."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[tuple[float, np.ndarray]]:
    """`(text_score, [bos] + ids + [eos])` per text, ids in the dataset's dtype."""
    dtype = token_dtype(tok.vocab_size)
    head = np.array([] if tok.bos_id is None else [tok.bos_id], dtype)
    tail = np.array([tok.eos_id], dtype)
    out = []
    for text, ids in zip(texts, tok.encode_many(texts), strict=True):
        if len(ids) and int(ids.max()) >= tok.vocab_size:
            raise DataError(
                f"tokenizer {tok.name} produced id {int(ids.max())} >= its vocab_size "
                f"{tok.vocab_size}: the tokenizer.json is inconsistent; re-save it."
            )
        out.append((text_score(text), np.concatenate([head, ids.astype(dtype), tail])))
    return out


def _encode_in_worker(texts: list[str]) -> list[tuple[float, np.ndarray]]:
    assert _worker_tokenizer is not None
    return encode_documents(_worker_tokenizer, texts)


class _StreamWriter:
    """Appends documents to one split's stream, written as `tokens_NNNNN.npy` files."""

    def __init__(self, directory: pathlib.Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        directory.mkdir(parents=True)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.num_docs = 0
        self.files: list[dict] = []

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        self.num_docs += 1
        if self._pending_len >= self.shard_tokens:
            stream = np.concatenate(self._pending)
            start = 0
            while len(stream) - start >= self.shard_tokens:
                self._write(stream[start : start + self.shard_tokens])
                start += self.shard_tokens
            self._pending = [stream[start:]]
            self._pending_len = len(stream) - start

    def finish(self) -> dict:
        if self._pending_len:
            self._write(np.concatenate(self._pending))
        return {
            "num_docs": self.num_docs,
            "num_tokens": sum(f["tokens"] for f in self.files),
            "files": self.files,
        }

    def _write(self, tokens: np.ndarray) -> None:
        name = f"tokens_{len(self.files):05d}.npy"
        np.save(self.directory / name, tokens)
        self.files.append({"file": name, "tokens": len(tokens)})


class _Splitter:
    """Routes documents to train/val by score, keeping both non-empty (see module docstring)."""

    def __init__(self, writers: dict[str, _StreamWriter], val_fraction: float):
        self.writers, self.val_fraction = writers, val_fraction
        self.total = {s: 0 for s in SPLITS}
        # A document held back from split s while the other split is empty.
        self.held: dict[str, tuple[float, np.ndarray] | None] = {s: None for s in SPLITS}

    def add(self, score: float, tokens: np.ndarray) -> None:
        split = "val" if score < self.val_fraction else "train"
        other = "train" if split == "val" else "val"
        self.total[split] += 1
        if self.total[other] == 0:
            held = self.held[split]
            # The one to move if `other` stays empty: lowest score from train, highest from val.
            if held is None or (score < held[0]) == (split == "train"):
                self.held[split], keep = (score, tokens), held
            else:
                keep = (score, tokens)
            if keep is not None:
                self.writers[split].add(keep[1])
            return
        self.writers[split].add(tokens)
        if self.held[other] is not None:
            self.writers[other].add(self.held[other][1])
            self.held[other] = None

    def finish(self, what: str) -> None:
        for split, other in (("train", "val"), ("val", "train")):
            held = self.held[split]
            if held is None:
                continue
            if self.total[split] < 2:
                raise DataError(
                    f"{what} holds {self.total[split]} document: the validation split holds "
                    "out whole documents, so at least 2 are needed; add documents (e.g. a "
                    ".jsonl file with one document per line)."
                )
            self.writers[other].add(held[1])
        if not any(self.total.values()):
            raise DataError(f"{what} holds no documents: check the inputs.")


def _chunks(texts: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        if len(chunk) >= _CHUNK_DOCS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded(
    chunks: Iterator[list[str]], tokenizer: str, tok: Tokenizer, workers: int
) -> Iterator[list[tuple[float, np.ndarray]]]:
    """Encoded chunks in input order, in this process or in `workers` spawned processes."""
    if workers == 1:
        for chunk in chunks:
            yield encode_documents(tok, chunk)
        return
    # spawn, not fork: the caller may run JAX threads, which a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        pending: list[concurrent.futures.Future] = []
        for chunk in chunks:
            pending.append(pool.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:  # Bounded read-ahead: memory stays flat.
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _progress(total: int | None, show: bool | None):
    from tqdm import tqdm

    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=total, unit="doc", desc="prepare", disable=not show, file=sys.stderr,
                unit_scale=True, dynamic_ncols=True)


def _check_params(val_percent: float, shard_tokens: int, workers: int) -> None:
    if not 0 <= val_percent < 100:
        raise DataError(
            f"val_percent must be in [0, 100), got {val_percent}: pass e.g. 2.0 (percent of "
            "documents held out for validation)."
        )
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens}.")
    if workers < 1:
        raise DataError(f"--workers must be a positive integer, got {workers}: pass e.g. 4.")


def _is_nonempty_dir(path: pathlib.Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def write_dataset(
    sources: Sequence[Source],
    *,
    tokenizer: str,
    out_dir: str | os.PathLike,
    val_percent: float,
    source: str,
    text_field: str = "text",
    encoding_errors: EncodingErrors = "strict",
    workers: int = 1,
    shard_tokens: int = 1 << 28,
    progress: bool | None = None,
) -> tuple[dict, bool]:
    """Writes the documents of `sources` as a prepared dataset in `out_dir`, atomically.

    Returns (metadata, True) when this call published `out_dir`, or (the metadata found there,
    False) when another process published it first; in both cases `out_dir` is complete.
    """
    _check_params(val_percent, shard_tokens, workers)
    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"encoding_errors={encoding_errors!r}: use 'strict' or 'replace'.")
    out = pathlib.Path(out_dir).expanduser().resolve()
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        writers = {s: _StreamWriter(tmp / s, dtype, shard_tokens) for s in SPLITS}
        splitter = _Splitter(writers, val_percent / 100)
        texts = (t for s in sources for t in read_records(
            s, text_field=text_field, encoding_errors=encoding_errors))
        # Documents are known in advance only when every input is one (a text file).
        total = len(sources) if all(s.kind == "text" for s in sources) else None
        with _progress(total, progress) as bar:
            for encoded in _encoded(_chunks(texts), tokenizer, tok, workers):
                for score, tokens in encoded:
                    splitter.add(score, tokens)
                bar.update(len(encoded))
        splitter.finish(source)
        splits = {s: writers[s].finish() for s in SPLITS}
        metadata = {
            "format_version": FORMAT_VERSION,
            # An absolute path: generate, export and eval reload it from any directory.
            "tokenizer": {"name": tok.name, "spec": tokenizer if tokenizer == "bytes"
                          else str(pathlib.Path(tokenizer).expanduser().resolve())},
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "dtype": dtype.name,
            "val_percent": val_percent,
            "text_field": text_field,
            "source": source,
            "inputs": [s.rel for s in sources],
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
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str,
    out_dir: str | os.PathLike,
    *,
    val_percent: float = 2.0,
    text_field: str = "text",
    encoding_errors: EncodingErrors = "strict",
    workers: int = 1,
    shard_tokens: int = 1 << 28,
    progress: bool | None = None,
) -> dict:
    """Tokenizes a corpus into `out_dir/{train,val}/tokens_*.npy` and returns the metadata.

    Args:
      inputs: a glob such as 'corpus/**/*.jsonl', a path (a file or a directory saved by
        `datasets.save_to_disk`) or a list of them; formats as in `sources`.
      tokenizer: "bytes" or a path to a tokenizer.json (bos/eos from the files beside it).
      out_dir: where to write; must not exist or be empty.
      val_percent: percent of documents held out for validation (by a hash of their text).
      text_field: the field holding the text in jsonl, parquet and Hugging Face datasets.
      encoding_errors: "strict" (non-UTF-8 text is an error) or "replace" (U+FFFD).
      workers: tokenizing processes (1: this process). More are spawned (not forked: the
        caller may run JAX threads), so a script calling this needs the
        `if __name__ == "__main__":` guard.
      shard_tokens: tokens per stored file.
      progress: show a progress bar on stderr (None: when stderr is a terminal).
    """
    out = pathlib.Path(out_dir).expanduser()
    if _is_nonempty_dir(out):
        raise DataError(
            f"output directory {out} already exists and is not empty: pass another --out "
            f"directory, or delete {out} first if you want to rebuild it."
        )
    sources = resolve_inputs(inputs)
    what = str(inputs) if isinstance(inputs, (str, os.PathLike)) else "the input list"
    metadata, created = write_dataset(
        sources,
        tokenizer=tokenizer,
        out_dir=out,
        val_percent=val_percent,
        source=what,
        text_field=text_field,
        encoding_errors=encoding_errors,
        workers=workers,
        shard_tokens=shard_tokens,
        progress=progress,
    )
    if not created:
        raise DataError(
            f"output directory {out} was created by another process while this one was "
            "preparing: pass another --out directory, or delete it and run prepare again."
        )
    return metadata
