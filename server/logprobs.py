"""Token logprobs in the two shapes OpenAI uses: legacy completions and chat."""

from __future__ import annotations

from typing import Any

from engine.outputs import TokenLogprob


def completion_logprobs(entries: list[TokenLogprob], top: int, text_offset: int) -> dict[str, Any]:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; offsets count characters from `text_offset`."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: lp for _, text, lp in e.top[:top]} for e in entries] if top > 0 else None,
        "text_offset": offsets,
    }


def next_text_offset(logprobs: dict[str, Any], start: int) -> int:
    """Where the token after this logprobs block begins (for the next streamed chunk)."""
    tokens = logprobs["tokens"]
    return (logprobs["text_offset"][-1] + len(tokens[-1])) if tokens else start


def chat_logprobs(entries: list[TokenLogprob], top: int) -> dict[str, Any]:
    """{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": list(e.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))} for _, text, lp in e.top[:top]
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }
