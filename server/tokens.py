"""The server's two uses of the engine's tokenizer: encoding prompts and rendering chat templates."""

from __future__ import annotations

from typing import Any


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    """Prompt text to ids; chat-template output already holds its special tokens, so it passes False."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
