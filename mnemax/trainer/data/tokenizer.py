"""Tokenizers: raw UTF-8 bytes, or a `tokenizer.json` read with the `tokenizers` library.

Both expose the same small interface (`Tokenizer`). `encode_many` is the bulk path used when
preparing a corpus: it returns one integer array per document, so no Python loop ever runs
over individual tokens.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mnemax.errors import DataError

# Special tokens that mark the end of a document, in the order they are looked for.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `eos_id < vocab_size`; ids are in `[0, vocab_size)`."""

    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; id 256 is end-of-document."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One uint8 array `[num_bytes]` per text."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Drops eos; bytes that are not valid UTF-8 (a row cut mid-character) become U+FFFD."""
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        arr = arr[arr != self.eos_id]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class JsonTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file.

    The eos id is the tokenizer's own end-of-document token if it has one (`</s>`,
    `<|endoftext|>`, `<eos>`); otherwise eos is a new id equal to the tokenizer's vocab size.
    """

    def __init__(self, path: str | pathlib.Path):
        import tokenizers  # Imported here so the byte tokenizer does not need the library.

        path = pathlib.Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # The library raises a bare Exception on malformed JSON.
            raise DataError(
                f"cannot read tokenizer file {path}: {e}. Pass a tokenizer.json written by the "
                "Hugging Face `tokenizers` library (Tokenizer.save), or use tokenizer=bytes."
            ) from e
        self.name = f"json:{path.name}"
        base_size = self._tok.get_vocab_size(with_added_tokens=True)
        found = [self._tok.token_to_id(t) for t in EOS_CANDIDATES]
        found = [i for i in found if i is not None]
        self.eos_id = found[0] if found else base_size
        self.vocab_size = base_size if found else base_size + 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One uint32 array per text, encoded in parallel by the Rust library."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Drops eos; other special tokens are kept as text."""
        kept = [int(i) for i in ids if int(i) != self.eos_id]
        return self._tok.decode(kept, skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`"bytes"` -> `ByteTokenizer`; a path to a `tokenizer.json` -> `JsonTokenizer`."""
    if spec == "bytes":
        return ByteTokenizer()
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            f"tokenizer {spec!r} is neither 'bytes' nor an existing tokenizer.json file: pass "
            "tokenizer=bytes or the path of a tokenizer.json saved by the `tokenizers` library."
        )
    return JsonTokenizer(path)
