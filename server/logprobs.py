"""Token logprobs in the two shapes OpenAI uses: legacy completions and chat.

A token's `bytes` are its real bytes from the vocabulary (engine/token_bytes.py), so a character split
over several tokens is rebuilt by joining them; its text shows a partial character as `\\xNN` escapes.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any

from engine.outputs import TokenLogprob
from engine.token_bytes import token_text

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


def echoed_logprobs(prompt_ids: list[int], entries: list[TokenLogprob | None], top: int, offsets: TextOffsets,
                    token_bytes: TokenBytes, shown: TokenBytes) -> dict[str, Any]:
    """The echoed prompt's part of completions logprobs (`echo` with `logprobs`): its first token has none.
    `shown` gives the bytes a token adds to the returned text (a skipped special token adds none)."""
    return {
        "tokens": [token_text(token_bytes(t)) for t in prompt_ids],
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {text: lp for _, text, lp in e.top[:top]} for e in entries]
        if top > 0 else None,
        "text_offset": [offsets.advance(shown(t)) for t in prompt_ids],
    }


def joined_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two completions logprobs blocks as one (the echoed prompt's, then the completion's)."""
    return {key: None if first[key] is None else first[key] + then[key] for key in first}


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], top: int) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token, token id -> {logprob, rank, decoded_token}, its `top` most
    likely tokens and the prompt token itself."""
    shaped: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            shaped.append(None)
            continue
        tokens = {str(t): {"logprob": lp, "rank": rank, "decoded_token": text}
                  for rank, (t, text, lp) in enumerate(entry.top[:top], 1)}
        tokens[str(entry.token_id)] = {"logprob": entry.logprob, "rank": entry.rank, "decoded_token": entry.token}
        shaped.append(tokens)
    return shaped
