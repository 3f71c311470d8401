"""Batches for training (infinite, shuffled, resumable grain pipeline) and evaluation.

Row order is defined globally, then dealt out to processes: global batch `k` is rows
`[k * global_batch, (k + 1) * global_batch)` of the shuffled, repeated row stream, and process
`p` of `n` takes every n-th of them starting at `p`. So the union of all processes' batch `k`
does not depend on the process count, and a saved position (a batch index) stays valid when a
run is resumed with a different number of processes.

With `data.mixture`, the row stream is `grain.MapDataset.mix` of the sources' shuffled,
repeated row streams: a deterministic interleaving in which every prefix holds each source in
proportion to its weight (to within one row per source). Eval mixes the sources' val splits
in order, with the same weights.
"""

from __future__ import annotations

import grain
import numpy as np

from mnemax.errors import DataError
from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.shards import TokenDataset, open_sources

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


class _Tag:
    """Row index -> (source, row index): the mixed stream remembers where each row is from."""

    def __init__(self, source: int):
        self.source = source

    def __call__(self, index: int) -> tuple[int, int]:
        return self.source, index


class _Gather:
    """A batch of (source, row index) pairs -> int32 rows `[n, seq_len + 1]`, one read per
    source."""

    def __init__(self, datasets: list[TokenDataset]):
        self.datasets = datasets

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        sources, indices = batch
        if len(self.datasets) == 1:
            return self.datasets[0].rows(indices)
        out = np.empty((len(indices), self.datasets[0].seq_len + 1), np.int32)
        for k in np.unique(sources):
            mask = sources == k
            out[mask] = self.datasets[k].rows(indices[mask])
        return out


def _source_seed(seed: int, source: int) -> int:
    """Source 0 keeps `seed` (a single source shuffles as before mixtures existed)."""
    return seed if source == 0 else int(np.random.SeedSequence([seed, source]).generate_state(1)[0])


def _row_stream(
    sources: list[tuple[TokenDataset, float]], seed: int | None
) -> grain.MapDataset:
    """The infinite stream of (source, row) pairs: each source's rows (shuffled per epoch
    unless `seed` is None) repeated, mixed by weight."""
    streams = []
    for k, (ds, _) in enumerate(sources):
        rows = grain.MapDataset.range(len(ds))
        if seed is not None:
            rows = rows.shuffle(seed=_source_seed(seed, k))
        streams.append(rows.repeat(None).map(_Tag(k)))
    if len(streams) == 1:
        return streams[0]
    return grain.MapDataset.mix(streams, [w for _, w in sources])


class BatchIterator:
    """Infinite iterator of training batches, int32 `[global_batch // process_count, seq_len + 1]`.

    Each epoch is a fresh permutation of the train rows (grain folds the epoch into the shuffle
    seed). `get_state()` is a small JSON-serialisable dict; `set_state()` on a new iterator
    continues exactly (bitwise) where the saved one was.
    """

    def __init__(
        self,
        sources: TokenDataset | list[tuple[TokenDataset, float]],
        cfg: DataConfig,
        process_index: int,
        process_count: int,
    ):
        if isinstance(sources, TokenDataset):
            sources = [(sources, 1.0)]
        self._cfg = cfg
        self._weights = [w for _, w in sources]
        # An int for one source: the state of runs from before mixtures still loads.
        rows = [len(ds) for ds, _ in sources]
        self._num_rows: int | list[int] = rows[0] if len(rows) == 1 else rows
        local = _local_batch(cfg, process_index, process_count)
        if not 0 <= cfg.seed < 2**32:
            raise DataError(f"data.seed={cfg.seed} must be in [0, 2**32): pick another seed.")
        for ds, _ in sources:
            if len(ds) < cfg.global_batch:
                raise DataError(
                    f"the train split of {ds.directory} has {len(ds)} rows of seq_len "
                    f"{cfg.seq_len}, fewer than one batch of data.global_batch="
                    f"{cfg.global_batch}: the corpus is too small; add text, or lower "
                    "data.global_batch or data.seq_len."
                )
        # The pipeline runs over (source, row index) pairs and gathers each batch's rows with
        # one read per row: ~4x cheaper per batch than grain reading and stacking rows one by
        # one.
        ds = _row_stream(sources, cfg.seed)
        ds = ds[process_index::process_count].batch(local, drop_remainder=True)
        ds = ds.map(_Gather([d for d, _ in sources]))
        self._iter = iter(ds.to_iter_dataset(_READ_OPTIONS))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._iter)

    def get_state(self) -> dict:
        """`{"next_batch", "global_batch", "seed", "num_rows"}` (ints; `num_rows` a list per
        source and `"weights"` added for a mixture)."""
        state = {
            "next_batch": int(self._iter.get_state()["next_index"]),
            "global_batch": self._cfg.global_batch,
            "seed": self._cfg.seed,
            "num_rows": self._num_rows,
        }
        if isinstance(self._num_rows, list):
            state["weights"] = self._weights
        return state

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from `get_state`, possibly of a run with other processes)."""
        weights = state.get("weights", [1.0])
        if (state["seed"] != self._cfg.seed or state["num_rows"] != self._num_rows
                or not np.allclose(weights, self._weights, rtol=1e-12, atol=0)):
            raise DataError(
                f"the saved data position is for seed {state['seed']} over {state['num_rows']} "
                f"train rows (weights {weights}), but this run has data.seed={self._cfg.seed} "
                f"over {self._num_rows} rows (weights {self._weights}): resume with the same "
                "data config (source or mixture, seq_len, seed), or start the run from scratch."
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
    return BatchIterator(open_sources(cfg, "train"), cfg, process_index, process_count)


def eval_batches(
    cfg: DataConfig, num_batches: int, *, process_index: int = 0, process_count: int = 1
) -> list[np.ndarray]:
    """The first `num_batches` batches of the val split, in order, int32 `[local, seq_len + 1]`.

    Rows are dealt to processes as in training; the split is cycled when it has fewer rows than
    needed, so a small val split never fails. With `data.mixture`, the sources' val rows are
    mixed in order with the training weights.
    """
    local = _local_batch(cfg, process_index, process_count)
    sources = open_sources(cfg, "val")
    for ds, _ in sources:
        if len(ds) == 0:
            raise DataError(
                f"the val split of {ds.directory} has {ds.num_tokens} tokens, less than one "
                f"row of data.seq_len + 1 = {cfg.seq_len + 1}: prepare the data again with a "
                "larger --val-percent or more documents, or lower data.seq_len."
            )
    stream = _row_stream(sources, seed=None)
    gather = _Gather([d for d, _ in sources])
    batches = []
    for k in range(num_batches):
        start = k * cfg.global_batch + process_index
        pairs = [stream[j] for j in range(start, start + local * process_count, process_count)]
        sources_of, rows = (np.array(x, dtype=np.int64) for x in zip(*pairs, strict=True))
        batches.append(gather((sources_of, rows)))
    return batches
