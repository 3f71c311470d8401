"""The data section of a recipe: where tokens come from and how they are batched."""

from __future__ import annotations

import dataclasses

from mnemax.trainer.data.mixture import parse_mixture


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from and how they are cut into batches.

    Batches are int32 arrays `[global_batch // process_count, seq_len + 1]`: each row holds the
    model's inputs (`row[:-1]`) and the next-token targets (`row[1:]`). Prepared datasets are
    token streams; rows are cut from them at load time, so any seq_len works with any dataset.
    """

    # "stdlib" (the running Python's standard library, built on first use and cached) or a
    # directory written by `mnemax data prepare`. Unused when `mixture` is set.
    source: str = "stdlib"
    # Several sources with weights, e.g. "data/web:0.7,data/code:0.3" (see data/mixture.py);
    # "" = `source` alone. Eval uses the same weights over the sources' val splits.
    mixture: str = ""
    # Tokens the model sees per sequence; rows are seq_len + 1 tokens (inputs + shifted targets).
    seq_len: int = 256
    # Sequences per optimizer step, summed over all processes.
    global_batch: int = 32
    # Shuffle seed of the training rows; each epoch is reshuffled from it.
    seed: int = 0
    # Percent of documents (chosen by a hash of their text) held out for validation; used when
    # building the stdlib corpus.
    val_percent: float = 2.0
    # "bytes" or a path to a tokenizer.json; only used to build the stdlib corpus.
    tokenizer: str = "bytes"

    def __post_init__(self) -> None:
        parse_mixture(self.mixture)  # A malformed mixture fails when the recipe is built.
