"""Reading prepared token streams: `open_dataset`, `open_sources` and the packed `TokenDataset`."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.corpus import ensure_stdlib_dataset
from mnemax.trainer.data.mixture import parse_mixture
from mnemax.trainer.data.prepare import FORMAT_VERSION, SPLITS
from mnemax.trainer.data.remote import is_url, mirror_split

_PREPARE_HINT = "run `mnemax data prepare --input 'corpus/**/*.txt' --out {dir}`"


class TokenDataset:
    """One split's token stream packed into rows: `ds[k]` is int32 `[seq_len + 1]`.

    Row k is tokens `[k * seq_len, k * seq_len + seq_len + 1)` of the split's stream (the
    concatenation of its files): consecutive rows share one boundary token, so every token after
    the first is a target exactly once; the trailing partial row is dropped. Files are
    memory-mapped, so opening is cheap and only touched rows are read. Pickling (e.g. into grain
    worker processes) sends the paths, not the arrays.
    """

    def __init__(self, directory: pathlib.Path, split: str, metadata: dict, seq_len: int):
        if seq_len < 1:
            raise DataError(f"data.seq_len={seq_len} must be a positive integer: pass e.g. 256.")
        self.directory = directory
        self.split = split
        self.metadata = metadata
        self.seq_len = seq_len
        self.vocab_size: int = metadata["vocab_size"]
        self.eos_id: int = metadata["eos_id"]
        files = metadata["splits"][split]["files"]
        self._paths = [directory / split / f["file"] for f in files]
        self._sizes = [int(f["tokens"]) for f in files]
        # _starts[k] is the stream position of file k's first token.
        self._starts = np.cumsum([0, *self._sizes])
        self.num_tokens = int(self._starts[-1])
        self._arrays = self._open()

    def _open(self) -> list[np.ndarray]:
        arrays = []
        for path, size in zip(self._paths, self._sizes, strict=True):
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(
                    f"cannot read {path}: {e}. The prepared dataset in {self.directory} is "
                    "incomplete or corrupt; delete it and run `mnemax data prepare` again."
                ) from e
            if arr.shape != (size,):
                raise DataError(
                    f"{path} has shape {arr.shape} but metadata.json says ({size},): the "
                    f"prepared dataset in {self.directory} is corrupt; delete it and run "
                    "`mnemax data prepare` again."
                )
            arrays.append(arr)
        return arrays

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_len)

    def _span(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copies stream tokens `[start, stop)` into `out`, across file boundaries."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self._starts[k + 1]))
            base = int(self._starts[k])
            out[: end - start] = self._arrays[k][start - base : end - base]
            out = out[end - start :]
            start, k = end, k + 1

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` as a fresh int32 array `[seq_len + 1]`."""
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        return self.rows(np.array([index % n]))[0]

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` (int array `[n]`, each in `[0, len)`) as int32 `[n, seq_len + 1]`."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and not (indices.min() >= 0 and indices.max() < len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        for i, k in enumerate(indices.tolist()):  # One slice copy per row; no per-token loop.
            self._span(k * self.seq_len, k * self.seq_len + self.seq_len + 1, out[i])
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arrays = self._open()

    def __repr__(self) -> str:
        return (f"TokenDataset({self.directory}, split={self.split!r}, seq_len={self.seq_len}, "
                f"rows={len(self)})")


def read_metadata(directory: pathlib.Path) -> dict:
    """Reads and checks `directory/metadata.json`; raises DataError naming the fix."""
    if not directory.is_dir():
        raise DataError(
            f"data directory {directory} does not exist: {_PREPARE_HINT.format(dir=directory)} "
            "or set data.source=stdlib."
        )
    path = directory / "metadata.json"
    if not path.is_file():
        raise DataError(
            f"data directory {directory} has no metadata.json, so it is not a prepared dataset "
            "(or its preparation never finished): "
            f"{_PREPARE_HINT.format(dir='<new dir>')} and point data.source at it."
        )
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON ({e}): the prepared dataset is corrupt; delete "
            f"{directory} and run `mnemax data prepare` again."
        ) from e
    version = metadata.get("format_version")
    if version == 1:
        raise DataError(
            f"{directory} was prepared by an older mnemax (format_version 1, rows of a fixed "
            f"seq_len {metadata.get('seq_len')}); this mnemax reads token streams "
            f"(format_version {FORMAT_VERSION}) and picks seq_len at train time: prepare the "
            f"corpus again, e.g. {_PREPARE_HINT.format(dir='<new dir>')}, and point "
            "data.source at the new directory."
        )
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {version}, but this mnemax reads version "
            f"{FORMAT_VERSION}: re-run `mnemax data prepare` with this version of mnemax."
        )
    return metadata


def _open_one(cfg: DataConfig, source: str, split: str) -> TokenDataset:
    if source == "stdlib":
        directory = ensure_stdlib_dataset(cfg)
    elif is_url(source):  # gs://bucket/data: read from a local mirror (remote.py)
        directory = mirror_split(source, split)
    else:
        directory = pathlib.Path(source).expanduser()
    metadata = read_metadata(directory)
    if split not in metadata["splits"]:
        raise DataError(
            f"{directory} has no {split!r} split (it has {sorted(metadata['splits'])}): "
            "re-run `mnemax data prepare` with this version of mnemax."
        )
    return TokenDataset(directory, split, metadata, cfg.seq_len)


def open_sources(cfg: DataConfig, split: str) -> list[tuple[TokenDataset, float]]:
    """`[(dataset, weight)]` of `split`: `data.mixture`'s sources, else `[(data.source, 1.0)]`.

    The sources of a mixture must share one tokenizer (vocabulary, eos and bos).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    pairs = parse_mixture(cfg.mixture) or [(cfg.source, 1.0)]
    opened = [(_open_one(cfg, source, split), w) for source, w in pairs]
    first = opened[0][0]
    key = ("vocab_size", "eos_id", "bos_id")
    for ds, _ in opened[1:]:
        if [ds.metadata.get(k) for k in key] != [first.metadata.get(k) for k in key]:
            raise DataError(
                f"data.mixture sources {first.directory} and {ds.directory} were prepared with "
                f"different tokenizers ({first.metadata['tokenizer']['spec']} vs "
                f"{ds.metadata['tokenizer']['spec']}): prepare every source with the same "
                "--tokenizer."
            )
    return opened


def open_dataset(cfg: DataConfig, split: str) -> TokenDataset:
    """Opens one split ("train" or "val") of `cfg.source`, building the stdlib corpus if needed.

    With `data.mixture`, the first source's split (every source shares its tokenizer, so its
    `vocab_size` and `eos_id` stand for all of them).
    """
    return open_sources(cfg, split)[0][0]
