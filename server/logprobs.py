"""Token logprobs in the two shapes OpenAI uses: legacy completions and chat.

A token's `bytes` are its real bytes from the vocabulary (engine/token_bytes.py), so a character split
over several tokens is rebuilt by joining them; its text shows a partial character as `\\xNN` escapes.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

from engine.outputs import TokenLogprob

TokenBytes = Callable[[int], bytes]


class TextOffsets:
    """Where each token begins in the returned text, counted in characters.

    A token that ends mid-character begins where that character does, and so does the token that
    completes it (OpenAI's convention), so an offset never points past the text.
    """

    def __init__(self, start: int) -> None:
        self.position = start
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def advance(self, data: bytes) -> int:
        begin = self.position
        self.position += len(self.decoder.decode(data))
        return begin


def completion_logprobs(entries: list[TokenLogprob], top: int, offsets: TextOffsets,
                        token_bytes: TokenBytes) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; `offsets` carries on across streamed chunks."""
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: lp for _, text, lp in e.top[:top]} for e in entries] if top > 0 else None,
        "text_offset": [offsets.advance(token_bytes(e.token_id)) for e in entries],
    }


def chat_logprobs(entries: list[TokenLogprob], top: int, token_bytes: TokenBytes) -> dict[str, Any]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(token_bytes(e.token_id)),
                "top_logprobs": [
                    {"token": text, "logprob": lp, "bytes": list(token_bytes(token_id))}
                    for token_id, text, lp in e.top[:top]
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }
