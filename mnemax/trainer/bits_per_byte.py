"""Bits per byte: a loss that runs with different tokenizers can compare.

bpb = (total nats over the target tokens) / (UTF-8 bytes of the text those tokens decode to)
/ ln 2. The bytes come from a per-id table summed over the targets: the byte tokenizer's ids
0..255 are one byte each and its eos none; a `tokenizer.json` vocabulary gives each token's
bytes from its own spelling (byte-level BPE as GPT-2 and Llama 3: one byte per character of
GPT-2's byte alphabet; SentencePiece: `▁` is a space, `<0xNN>` one byte); special tokens (bos,
eos, added control tokens) are no text, 0 bytes.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from mnemax.trainer.data import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (the byte-level BPE alphabet)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    types = {decoder.get("type", "")}
    for inner in decoder.get("decoders", []) or []:
        types |= _decoder_types(inner)
    return types


def token_byte_lengths(tokenizer: Tokenizer, spec: str) -> np.ndarray:
    """UTF-8 bytes of each id's text, int32 `[tokenizer.vocab_size]`; `spec` is the
    tokenizer's ("bytes" or the tokenizer.json path it was loaded from)."""
    specials = {tokenizer.eos_id, getattr(tokenizer, "bos_id", None)}
    if spec == "bytes":
        lengths = np.ones(tokenizer.vocab_size, np.int32)
        lengths[[i for i in specials if i is not None]] = 0
        return lengths
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(spec)
    described = json.loads(tok.to_str())
    specials |= {t["id"] for t in described.get("added_tokens", []) if t.get("special")}
    byte_level = "ByteLevel" in _decoder_types(described.get("decoder"))
    alphabet = set(bytes_to_unicode().values())
    lengths = np.zeros(tokenizer.vocab_size, np.int32)
    for i in range(tokenizer.vocab_size):
        piece = tok.id_to_token(i)
        if i in specials or piece is None:
            continue
        if byte_level and all(c in alphabet for c in piece):
            lengths[i] = len(piece)
        elif _BYTE_FALLBACK.fullmatch(piece):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def bits_per_byte(mean_nats: float, tokens: int, num_bytes: int) -> float:
    """`mean_nats` per token over `tokens` targets that spell `num_bytes` bytes -> bits per
    byte (inf when the targets spell no bytes)."""
    return mean_nats * tokens / num_bytes / math.log(2) if num_bytes else math.inf
