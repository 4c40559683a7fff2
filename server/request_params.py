"""From an OpenAI request to what the engine takes: SamplingParams and a checked token budget."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.guard.request_limits import RequestLimits, check_request_limits
from server.protocol import SamplingFields, unsupported_fields


def check_request(request: SamplingFields, limits: RequestLimits) -> None:
    """A 400 for the first field Minerva cannot honour or that is over this server's limits."""
    problems = unsupported_fields(request)
    if problems:
        param, why = problems[0]
        raise APIError(400, why, param=param, code="unsupported_parameter")
    check_request_limits(request, limits)


def resolve_max_tokens(prompt_tokens: int, requested: int | None, max_model_len: int, param: str) -> int:
    """The completion budget, clamped to what the context has left (as llama.cpp's server does: agents ask
    for more than small models hold, and the response then ends with finish_reason "length").
    Only a prompt that fills the context alone is a 400."""
    if prompt_tokens >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{prompt_tokens} tokens, leaving no room for a completion.",
                       param="prompt" if param == "max_tokens" else "messages", code="context_length_exceeded")
    left = max_model_len - prompt_tokens
    return left if requested is None else min(requested, left)


def sampling_params(request: SamplingFields, *, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """OpenAI defaults where the request leaves a field out: temperature 1, top_p 1, no penalties."""
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return SamplingParams(
        n=request.n,
        max_tokens=max_tokens,
        min_tokens=min(request.min_tokens, max_tokens),
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=0 if request.top_k is None else request.top_k,
        min_p=0.0 if request.min_p is None else request.min_p,
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        presence_penalty=0.0 if request.presence_penalty is None else request.presence_penalty,
        frequency_penalty=0.0 if request.frequency_penalty is None else request.frequency_penalty,
        seed=request.seed,
        stop=stop,
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
    )
