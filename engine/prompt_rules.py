"""The model-dependent request rules: prompt ids in the vocabulary, the prompt within the context,
and the completion budget. The engine applies them when it takes a request; the server calls the
same functions earlier (it needs the budget to reserve rate-limit tokens), so each rule lives once.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.errors import InvalidRequestError

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's error code for a prompt that cannot fit


def check_prompt_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    """A non-empty prompt whose every id is a token of the model's vocabulary."""
    if not ids:
        raise InvalidRequestError("the prompt must contain at least one token", param)
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is out of range for a vocabulary of {vocab_size}", param)


def completion_budget(prompt_tokens: int, requested: int | None, max_model_len: int, param: str = "prompt") -> int:
    """How many tokens may be generated: `requested` clamped to what the context has left, as llama.cpp's
    server does (agents ask for more than small models hold; the response then ends with "length").
    Only a prompt that fills the context alone is an error, naming `param` (the prompt or the messages)."""
    if prompt_tokens >= max_model_len:
        raise InvalidRequestError(f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                                  f"has {prompt_tokens} tokens, leaving no room for a completion.", param,
                                  code=CONTEXT_LENGTH_EXCEEDED)
    left = max_model_len - prompt_tokens
    return left if requested is None else min(requested, left)
