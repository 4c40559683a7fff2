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


def check_stops(stops: list[str], param: str, limits: RequestLimits, *, single: bool = False) -> None:
    """Stop sequences (OpenAI's `stop`, Anthropic's `stop_sequences`) within the count and length caps;
    `single`: the client sent one string, named without an index."""
    if len(stops) > limits.max_stop:
        raise _too_many(param, "stop sequences", len(stops), limits.max_stop)
    for index, stop in enumerate(stops):
        if len(stop) > limits.max_stop_length:
            where = param if single else f"{param}.{index}"
            raise APIError(400, f"{where}: a stop sequence of {len(stop)} characters exceeds this server's limit "
                                f"of {limits.max_stop_length}", param=where, code="limit_exceeded")


def check_message_count(count: int, limits: RequestLimits, param: str = "messages") -> None:
    """Chat and Anthropic `messages`, Responses `input` items."""
    if count > limits.max_messages:
        raise _too_many(param, "messages", count, limits.max_messages)


def check_request_limits(body: SamplingFields, limits: RequestLimits) -> None:
    """Raise a 400 for the first field over its cap."""
    if body.n > limits.max_n:
        raise _too_many("n", "choices", body.n, limits.max_n)
    if body.samples > limits.max_n:
        raise _too_many("best_of", "samples", body.samples, limits.max_n)
    check_stops(body.stop_sequences, "stop", limits, single=isinstance(body.stop, str))
    if body.stop_token_ids and len(body.stop_token_ids) > limits.max_stop_token_ids:
        raise _too_many("stop_token_ids", "stop token ids", len(body.stop_token_ids), limits.max_stop_token_ids)
    if body.prompt_logprobs is not None and body.prompt_logprobs > limits.max_logprobs:
        raise _too_many("prompt_logprobs", "logprobs per token", body.prompt_logprobs, limits.max_logprobs)
    if isinstance(body, CompletionRequest):
        prompts = split_prompts(body.prompt)
        if len(prompts) > limits.max_prompts:
            raise _too_many("prompt", "prompts", len(prompts), limits.max_prompts)
        if body.logprobs is not None and body.logprobs > limits.max_logprobs:
            raise _too_many("logprobs", "logprobs per token", body.logprobs, limits.max_logprobs)
    if isinstance(body, ChatCompletionRequest):
        check_message_count(len(body.messages), limits)
        if body.top_logprobs is not None and body.top_logprobs > limits.max_logprobs:
            raise _too_many("top_logprobs", "logprobs per token", body.top_logprobs, limits.max_logprobs)
