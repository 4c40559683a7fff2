"""Each token's real bytes, read from the tokenizer's vocabulary (what OpenAI's logprob `bytes` carry).

Decoding one token alone gives U+FFFD for a token that holds part of a character; its bytes come from
the vocabulary instead: byte-level BPE (GPT-2's byte-to-symbol table, reversed), SentencePiece byte
fallback (`<0xE2>`) and metaspace (`▁` is a space); added tokens are their text in UTF-8.
"""

from __future__ import annotations

import functools
import json
import re

import tokenizers

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "\u2581"


@functools.cache
def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: symbol -> the byte it stands for (printable bytes stand for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    symbols = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return {symbol: byte for byte, symbol in symbols.items()}


def decoder_kinds(backend: tokenizers.Tokenizer) -> set[str]:
    """The decoder steps of an HF `tokenizers` backend (a Sequence's members included), by type name."""
    decoder = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}  # not the vocab
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {step.get("type", "") for step in steps}
    if any(step.get("type") == "Replace" and METASPACE in json.dumps(step, ensure_ascii=False) for step in steps):
        kinds.add("Metaspace")
    return kinds


class TokenBytes:
    """token id -> bytes, worked out per id on first use."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend
        kinds = decoder_kinds(backend)
        self.byte_level = "ByteLevel" in kinds
        self.byte_fallback = "ByteFallback" in kinds
        self.metaspace = "Metaspace" in kinds
        added = backend.get_added_tokens_decoder()
        self.added = {token_id: token.content for token_id, token in added.items()}
        self.special = frozenset(token_id for token_id, token in added.items() if token.special)

    @functools.lru_cache(maxsize=65536)
    def __call__(self, token_id: int) -> bytes:
        piece = self.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self.byte_fallback and (match := BYTE_TOKEN.fullmatch(piece)):
            return bytes([int(match.group(1), 16)])
        if token_id in self.added:
            return self.added[token_id].encode("utf-8")
        if self.byte_level:
            table = byte_level_table()
            if all(symbol in table for symbol in piece):
                return bytes(table[symbol] for symbol in piece)
        if self.metaspace:
            return piece.replace(METASPACE, " ").encode("utf-8")
        return self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")


def token_text(data: bytes) -> str:
    """A token's text as OpenAI shows it: UTF-8, with the bytes of a partial character as `\\xNN` escapes."""
    return data.decode("utf-8", "backslashreplace")
