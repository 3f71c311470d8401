"""Batches for training (infinite, shuffled, resumable grain pipeline) and evaluation.

Row order is defined globally, then dealt out to processes: global batch `k` is rows
`[k * global_batch, (k + 1) * global_batch)` of the shuffled, repeated row stream, and process
`p` of `n` takes every n-th of them starting at `p`. So the union of all processes' batch `k`
does not depend on the process count, and a saved position (a batch index) stays valid when a
run is resumed with a different number of processes.
"""

from __future__ import annotations

import grain
import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.shards import TokenDataset, open_dataset

# Batches are small (tens of KiB to a few MiB) and rows are memory-mapped: a short buffer hides
# the read latency without holding hundreds of batches in memory (grain's default is 500).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def _local_batch(cfg: DataConfig, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} is not in [0, process_count={process_count}): "
            "pass the values of jax.process_index() and jax.process_count()."
        )
    if cfg.global_batch < 1 or cfg.global_batch % process_count:
        raise DataError(
            f"data.global_batch={cfg.global_batch} is not a positive multiple of the process "
            f"count {process_count}: every process loads global_batch / process_count rows; "
            f"set data.global_batch to a multiple of {process_count}."
        )
    return cfg.global_batch // process_count


class BatchIterator:
    """Infinite iterator of training batches, int32 `[global_batch // process_count, seq_len + 1]`.

    Each epoch is a fresh permutation of the train rows (grain folds the epoch into the shuffle
    seed). `get_state()` is a small JSON-serialisable dict; `set_state()` on a new iterator
    continues exactly (bitwise) where the saved one was.
    """

    def __init__(
        self, dataset: TokenDataset, cfg: DataConfig, process_index: int, process_count: int
    ):
        self._cfg = cfg
        self._num_rows = len(dataset)
        local = _local_batch(cfg, process_index, process_count)
        if not 0 <= cfg.seed < 2**32:
            raise DataError(f"data.seed={cfg.seed} must be in [0, 2**32): pick another seed.")
        if self._num_rows < cfg.global_batch:
            raise DataError(
                f"the train split of {dataset.directory} has {self._num_rows} rows, fewer than "
                f"one batch of data.global_batch={cfg.global_batch}: the corpus is too small; "
                "add text, lower data.global_batch, or lower data.seq_len and prepare again."
            )
        # The pipeline runs over row *indices* and gathers each batch's rows with one
        # vectorized read: same rows in the same order as `MapDataset.source(dataset)`, but
        # ~4x cheaper per batch than grain reading and stacking rows one by one.
        ds = grain.MapDataset.range(self._num_rows).shuffle(seed=cfg.seed).repeat(None)
        ds = ds[process_index::process_count].batch(local, drop_remainder=True)
        ds = ds.map(dataset.rows)
        self._iter = iter(ds.to_iter_dataset(_READ_OPTIONS))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iter)

    def get_state(self) -> dict:
        """`{"next_batch", "global_batch", "seed", "num_rows"}`, all ints."""
        return {
            "next_batch": int(self._iter.get_state()["next_index"]),
            "global_batch": self._cfg.global_batch,
            "seed": self._cfg.seed,
            "num_rows": self._num_rows,
        }

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from `get_state`, possibly of a run with other processes)."""
        if state["seed"] != self._cfg.seed or state["num_rows"] != self._num_rows:
            raise DataError(
                f"the saved data position is for seed {state['seed']} over {state['num_rows']} "
                f"train rows, but this run has data.seed={self._cfg.seed} over "
                f"{self._num_rows} rows: resume with the same data config, or start the "
                "run from scratch."
            )
        rows_seen = int(state["next_batch"]) * int(state["global_batch"])
        if rows_seen % self._cfg.global_batch:
            raise DataError(
                f"the saved data position ({rows_seen} rows) is not a whole number of batches "
                f"of data.global_batch={self._cfg.global_batch}: resume with "
                f"data.global_batch={state['global_batch']}."
            )
        self._iter.set_state({"next_index": rows_seen // self._cfg.global_batch})


def train_iterator(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> BatchIterator:
    """The infinite, shuffled training batches of this process (see module docstring)."""
    return BatchIterator(open_dataset(cfg, "train"), cfg, process_index, process_count)


def eval_batches(
    cfg: DataConfig, num_batches: int, *, process_index: int = 0, process_count: int = 1
) -> list[np.ndarray]:
    """The first `num_batches` batches of the val split, in order, int32 `[local, seq_len + 1]`.

    Rows are dealt to processes as in training; the split is cycled when it has fewer rows than
    needed, so a small val split never fails.
    """
    local = _local_batch(cfg, process_index, process_count)
    dataset = open_dataset(cfg, "val")
    n = len(dataset)
    if n == 0:
        raise DataError(
            f"the val split of {dataset.directory} is empty: prepare the data again with a "
            "larger --val-percent or more files."
        )
    batches = []
    for k in range(num_batches):
        start = k * cfg.global_batch + process_index
        rows = np.arange(start, start + local * process_count, process_count) % n
        batches.append(dataset.rows(rows))
    return batches
