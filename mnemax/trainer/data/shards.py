"""Reading prepared token shards: `open_dataset` and the random-access `TokenDataset`."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.corpus import ensure_stdlib_dataset
from mnemax.trainer.data.prepare import FORMAT_VERSION, SPLITS

_PREPARE_HINT = "run `mnemax data prepare --input 'corpus/**/*.txt' --out {dir}`"


class TokenDataset:
    """Random access over the rows of one split: `ds[i]` is int32 `[seq_len + 1]`.

    Shards are memory-mapped, so opening is cheap and only touched rows are read. Pickling
    (e.g. into grain worker processes) sends the paths, not the arrays.
    """

    def __init__(self, directory: pathlib.Path, split: str, metadata: dict):
        self.directory = directory
        self.split = split
        self.metadata = metadata
        self.seq_len: int = metadata["seq_len"]
        self.vocab_size: int = metadata["vocab_size"]
        self.eos_id: int = metadata["eos_id"]
        shards = metadata["splits"][split]["shards"]
        self._paths = [directory / split / s["file"] for s in shards]
        self._rows = [int(s["rows"]) for s in shards]
        # _starts[k] is the global index of shard k's first row.
        self._starts = np.cumsum([0, *self._rows])
        self._arrays = self._open()

    def _open(self) -> list[np.ndarray]:
        arrays = []
        for path, rows in zip(self._paths, self._rows, strict=True):
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(
                    f"cannot read shard {path}: {e}. The prepared dataset in {self.directory} "
                    "is incomplete or corrupt; delete it and run `mnemax data prepare` again."
                ) from e
            if arr.shape != (rows, self.seq_len + 1):
                raise DataError(
                    f"shard {path} has shape {arr.shape} but metadata.json says "
                    f"{(rows, self.seq_len + 1)}: the prepared dataset in {self.directory} is "
                    "corrupt; delete it and run `mnemax data prepare` again."
                )
            arrays.append(arr)
        return arrays

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` as a fresh int32 array `[seq_len + 1]`."""
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        index %= n
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._arrays[shard][index - self._starts[shard]].astype(np.int32)

    def rows(self, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` (int array `[n]`, each in `[0, len)`) as int32 `[n, seq_len + 1]`.

        One vectorized gather per shard touched, so the cost does not grow with Python loops
        over rows or tokens.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and not (indices.min() >= 0 and indices.max() < len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self._arrays[shard][indices[mask] - self._starts[shard]]
        return out

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._arrays = self._open()

    def __repr__(self) -> str:
        return f"TokenDataset({self.directory}, split={self.split!r}, rows={len(self)})"


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
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {version}, but this mnemax reads version "
            f"{FORMAT_VERSION}: re-run `mnemax data prepare` with this version of mnemax."
        )
    return metadata


def open_dataset(cfg: DataConfig, split: str) -> TokenDataset:
    """Opens one split ("train" or "val") of `cfg.source`, building the stdlib corpus if needed."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    if cfg.source == "stdlib":
        directory = ensure_stdlib_dataset(cfg)
    else:
        directory = pathlib.Path(cfg.source).expanduser()
    metadata = read_metadata(directory)
    if metadata["seq_len"] != cfg.seq_len:
        raise DataError(
            f"the data in {directory} was prepared with seq_len {metadata['seq_len']} but the "
            f"recipe asks for seq_len {cfg.seq_len}: re-run `mnemax data prepare` with "
            f"--seq-len {cfg.seq_len}, or set data.seq_len={metadata['seq_len']}."
        )
    if split not in metadata["splits"]:
        raise DataError(
            f"{directory} has no {split!r} split (it has {sorted(metadata['splits'])}): "
            "re-run `mnemax data prepare` with this version of mnemax."
        )
    return TokenDataset(directory, split, metadata)
