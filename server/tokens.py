"""Prompt text to token ids, for completions (raw prompts) and chat (rendered templates)."""

from __future__ import annotations

from engine.tokenizer import Tokenizer
from server.errors import APIError


def encode(tokenizer: Tokenizer, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
    """Chat-template output already holds its special tokens, so chat passes add_special_tokens=False.

    JSON may escape lone UTF-16 surrogates ("\\ud800") that no UTF-8 text can hold; such a
    prompt is the client's error (400 naming `param`), not the tokenizer's.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: text is not valid Unicode ({exc.reason} at position {exc.start})",
                       param=param) from None
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
