"""From an OpenAI request to what the engine takes: SamplingParams (the token budget is the engine's rule,
`engine.prompt_rules.completion_budget`)."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.guard.request_limits import check_request_limits
from server.settings import RequestLimits
from server.protocol import SamplingFields, unsupported_fields


def check_request(request: SamplingFields, limits: RequestLimits) -> None:
    """A 400 for the first field Minerva cannot honour or that is over this server's limits."""
    problems = unsupported_fields(request)
    if problems:
        param, why = problems[0]
        raise APIError(400, why, param=param, code="unsupported_parameter")
    check_request_limits(request, limits)


def sampling_params(request: SamplingFields, *, max_tokens: int, logprobs: int | None,
                    n: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI defaults where the request leaves a field out: temperature 1, top_p 1, no penalties.

    `n`: samples per prompt when it differs from the request's n (best_of); `prompt_logprobs`: what the
    endpoint needs scored of the prompt (vLLM's field, or completions' echo with logprobs)."""
    return SamplingParams(
        n=request.n if n is None else n,
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
        stop=request.stop_sequences,
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
        logit_bias=token_biases(request.logit_bias),
        prompt_logprobs=prompt_logprobs,
    )


def token_biases(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's JSON keys (token ids as strings) as ints; the engine checks ids and ranges."""
    if not logit_bias:
        return None
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
