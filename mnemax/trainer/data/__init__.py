"""Token data for pretraining: tokenizers, corpus preparation, training and eval batches.

`prepare` stores a corpus as unpacked token streams; rows of `seq_len + 1` tokens are cut when
the data is opened, so one prepared dataset serves every sequence length. Typical use::

    prepare("corpus/*.jsonl", "bytes", "data/corpus")   # or `mnemax data prepare`
    cfg = DataConfig(source="data/corpus", seq_len=256, global_batch=32)
    it = train_iterator(cfg, process_index=jax.process_index(),
                        process_count=jax.process_count())
    batch = next(it)        # int32 [32 // process_count, 257]
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes bitwise
"""

from __future__ import annotations

import importlib
import typing

# Bound now: the function shares its name with its module, which an import of the module
# would otherwise bind here.
from mnemax.trainer.data.prepare import prepare

# The rest is imported on first use (PEP 562), so that tokenizing worker processes, which import
# `prepare` only, do not pay for grain.
_EXPORTS = {
    "BatchIterator": "pipeline",
    "ByteTokenizer": "tokenizer",
    "DataConfig": "config",
    "JsonTokenizer": "tokenizer",
    "TokenDataset": "shards",
    "Tokenizer": "tokenizer",
    "eval_batches": "pipeline",
    "load_tokenizer": "tokenizer",
    "open_dataset": "shards",
    "open_sources": "shards",
    "parse_mixture": "mixture",
    "stdlib_corpus_files": "corpus",
    "train_iterator": "pipeline",
}
__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "JsonTokenizer",
    "TokenDataset",
    "Tokenizer",
    "eval_batches",
    "load_tokenizer",
    "open_dataset",
    "open_sources",
    "parse_mixture",
    "prepare",
    "stdlib_corpus_files",
    "train_iterator",
]

if typing.TYPE_CHECKING:
    from mnemax.trainer.data.config import DataConfig
    from mnemax.trainer.data.corpus import stdlib_corpus_files
    from mnemax.trainer.data.mixture import parse_mixture
    from mnemax.trainer.data.pipeline import BatchIterator, eval_batches, train_iterator
    from mnemax.trainer.data.shards import TokenDataset, open_dataset, open_sources
    from mnemax.trainer.data.tokenizer import (
        ByteTokenizer,
        JsonTokenizer,
        Tokenizer,
        load_tokenizer,
    )


def __getattr__(name: str) -> typing.Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
