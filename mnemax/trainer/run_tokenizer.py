"""Which tokenizer a recipe's tokens were made with (for the tools that turn ids back into
text or bytes: `mnemax generate`, `export`, bits per byte in `eval`)."""

from __future__ import annotations

import json
import os

from etils import epath

from mnemax.trainer.data import DataConfig, Tokenizer, load_tokenizer


def tokenizer_spec(data: DataConfig) -> str:
    """`"bytes"` or a tokenizer.json path: the one a prepared dataset's `metadata.json` names
    (the first source of a mixture), else `data.tokenizer` (the stdlib corpus)."""
    sources = [data.source]
    if getattr(data, "mixture", ""):
        from mnemax.trainer.data.mixture import parse_mixture

        sources = [source for source, _ in parse_mixture(data.mixture)]
    if sources[0] != "stdlib":
        meta = epath.Path(os.path.expanduser(sources[0])) / "metadata.json"  # or a URL
        if meta.exists():
            spec = json.loads(meta.read_text()).get("tokenizer", {}).get("spec")
            if spec:
                return spec
    return data.tokenizer


def run_tokenizer(data: DataConfig) -> Tokenizer:
    """The tokenizer of `data` (see `tokenizer_spec`)."""
    return load_tokenizer(tokenizer_spec(data))
