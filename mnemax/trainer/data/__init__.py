"""Token data for pretraining: tokenizers, corpus preparation, training and eval batches.

Typical use::

    cfg = DataConfig(source="stdlib", seq_len=256, global_batch=32)
    it = train_iterator(cfg, process_index=jax.process_index(),
                        process_count=jax.process_count())
    batch = next(it)        # int32 [32 // process_count, 257]
    state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes bitwise
"""

from __future__ import annotations

from mnemax.trainer.data.config import DataConfig
from mnemax.trainer.data.corpus import stdlib_corpus_files
from mnemax.trainer.data.pipeline import BatchIterator, eval_batches, train_iterator
from mnemax.trainer.data.prepare import prepare
from mnemax.trainer.data.shards import TokenDataset, open_dataset
from mnemax.trainer.data.tokenizer import ByteTokenizer, JsonTokenizer, Tokenizer, load_tokenizer

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
    "prepare",
    "stdlib_corpus_files",
    "train_iterator",
]
