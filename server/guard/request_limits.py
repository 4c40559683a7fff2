"""Caps on what one request may ask for, so a single client cannot make the server do unbounded work.

Each violation is a 400 naming the offending field (OpenAI's `param`). The prompt
length against the model's context is checked (and max_tokens clamped to what it leaves) where the prompt is
tokenized (server/request_params.py); the body size by BodySizeLimit.
"""

from __future__ import annotations

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, split_prompts
from server.settings import RequestLimits


def _too_many(param: str, what: str, count: int, cap: int) -> APIError:
    return APIError(400, f"{param}: {count} is over this server's limit of {cap} {what}", param=param,
                    code="limit_exceeded")


def check_request_limits(body: SamplingFields, limits: RequestLimits) -> None:
    """Raise a 400 for the first field over its cap."""
    if body.n > limits.max_n:  # best_of is n or refused (server/protocol.py), so this caps it too
        raise _too_many("n", "choices", body.n, limits.max_n)
    stops = body.stop_sequences
    if len(stops) > limits.max_stop:
        raise _too_many("stop", "stop sequences", len(stops), limits.max_stop)
    for index, stop in enumerate(stops):
        if len(stop) > limits.max_stop_length:
            param = "stop" if isinstance(body.stop, str) else f"stop.{index}"
            raise APIError(400, f"{param}: a stop sequence of {len(stop)} characters exceeds this server's limit "
                                f"of {limits.max_stop_length}", param=param, code="limit_exceeded")
    if body.stop_token_ids and len(body.stop_token_ids) > limits.max_stop_token_ids:
        raise _too_many("stop_token_ids", "stop token ids", len(body.stop_token_ids), limits.max_stop_token_ids)
    if isinstance(body, CompletionRequest):
        prompts = split_prompts(body.prompt)
        if len(prompts) > limits.max_prompts:
            raise _too_many("prompt", "prompts", len(prompts), limits.max_prompts)
        if body.logprobs is not None and body.logprobs > limits.max_logprobs:
            raise _too_many("logprobs", "logprobs per token", body.logprobs, limits.max_logprobs)
    if isinstance(body, ChatCompletionRequest):
        if len(body.messages) > limits.max_messages:
            raise _too_many("messages", "messages", len(body.messages), limits.max_messages)
        if body.top_logprobs is not None and body.top_logprobs > limits.max_logprobs:
            raise _too_many("top_logprobs", "logprobs per token", body.top_logprobs, limits.max_logprobs)
