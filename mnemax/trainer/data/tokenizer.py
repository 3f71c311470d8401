"""Tokenizers: raw UTF-8 bytes, or a `tokenizer.json` read with the `tokenizers` library.

Both expose the same small interface (`Tokenizer`). `encode_many` is the bulk path used when
preparing a corpus: it returns one integer array per document, so no Python loop ever runs
over individual tokens. A prepared document is `[bos] + encode(text) + [eos]` (`bos_id` None:
no bos), following the Hugging Face convention of naming both in `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from mnemax.errors import DataError

# End-of-document tokens looked for, in this order, only when no tokenizer_config.json or
# special_tokens_map.json lies beside the tokenizer.json (a bare `tokenizers` save).
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>")
# The files, beside tokenizer.json, that name the special tokens (transformers' save_pretrained
# writes both; tokenizer_config.json wins where they disagree, as in transformers).
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `eos_id < vocab_size`; ids are in `[0, vocab_size)`."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; id 256 is end-of-document; no bos."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256
    bos_id = None

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


def _token_content(value: object) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(directory: pathlib.Path) -> dict[str, str | None] | None:
    """`{"bos_token", "eos_token"}` named by the config files in `directory`, or None when
    neither tokenizer_config.json nor special_tokens_map.json exists there."""
    found: dict[str, str | None] = {"bos_token": None, "eos_token": None}
    present = False
    for name in reversed(SPECIAL_TOKEN_FILES):  # The first file wins: read it last.
        path = directory / name
        if not path.is_file():
            continue
        present = True
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {path}: {e}. Fix or delete the file.") from e
        for key in found:
            if key in config:
                found[key] = _token_content(config[key])
    return found if present else None


class JsonTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file.

    bos and eos are the tokens that `tokenizer_config.json` (else `special_tokens_map.json`)
    beside the file names as `bos_token` / `eos_token` (a string or a dict with "content"), so
    Llama 3's `<|begin_of_text|>` / `<|end_of_text|>` are found. Only when neither file exists
    is eos looked up from `EOS_CANDIDATES` (`</s>`, `<|endoftext|>`, `<eos>`), with no bos. A
    tokenizer without an eos is a `DataError`: documents could not be told apart.
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
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = special_tokens(path.parent)
        if named is None:
            found = [t for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None]
            named = {"bos_token": None, "eos_token": found[0] if found else None}
            where = f"none of {', '.join(EOS_CANDIDATES)} is in its vocabulary"
        else:
            where = f"{' / '.join(SPECIAL_TOKEN_FILES)} beside it name no eos_token"
        if named["eos_token"] is None:
            raise DataError(
                f"tokenizer {path} has no end-of-document token ({where}): documents could "
                "not be told apart. Write a tokenizer_config.json beside it naming one, e.g. "
                '{"eos_token": "</s>"}, with a token of its vocabulary.'
            )
        self.eos_id = self._token_id(path, "eos_token", named["eos_token"])
        bos = named["bos_token"]
        self.bos_id = None if bos is None else self._token_id(path, "bos_token", bos)

    def _token_id(self, path: pathlib.Path, key: str, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"{key} {token!r} named beside {path} is not in the tokenizer's vocabulary: "
                f"fix {key} in {SPECIAL_TOKEN_FILES[0]} to a token of this tokenizer."
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One uint32 array per text, encoded in parallel by the Rust library."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Drops bos and eos; other special tokens are kept as text."""
        kept = [int(i) for i in ids if int(i) not in (self.eos_id, self.bos_id)]
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
