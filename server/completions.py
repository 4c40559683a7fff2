"""POST /v1/completions: legacy text completion, streamed or not, for one or many prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput, TokenLogprob
from engine.prompt_rules import check_prompt_ids, completion_budget
from engine.tokenizer import Tokenizer
from server.choices import ChoiceTracker, new_id, now
from server.errors import APIError
from server.logprobs import (TextOffsets, completion_logprobs, echoed_logprobs, joined_logprobs,
                             vllm_prompt_logprobs)
from server.protocol import CompletionRequest, split_prompts
from server.guard.http import reserve_tokens
from server.observability.request_record import note_request, recorded
from server.request_params import check_request, sampling_params
from server.responses import Outputs, collect, stream
from server.served_models import ServedModel
from server.streams import generate_many
from server.tokens import encode

router = APIRouter()
# Prompts up to this many characters (or ids) in all are tokenized on the event loop (tens of microseconds):
# a hop to a worker thread and back costs two turns of a busy loop (measured: 55 ms median at 256 streams).
INLINE_PROMPT_SIZE = 4096


def prompt_token_ids(served: ServedModel, prompts: list[str | list[int]]) -> list[list[int]]:
    """Each prompt as token ids: strings are tokenized (with BOS); every list is held to the engine's rule."""
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    token_lists = []
    for item in prompts:
        if isinstance(item, str):
            ids = encode(served.engine.tokenizer, item, add_special_tokens=True, param="prompt")
        else:
            ids = list(item)
        check_prompt_ids(ids, served.engine.model_info.vocab_size)
        token_lists.append(ids)
    return token_lists


def echo_text(served: ServedModel, text: str | list[int], ids: list[int]) -> str:
    return text if isinstance(text, str) else served.engine.tokenizer.decode(ids)


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    check_request(body, request.app.state.settings.request_limits)
    record = note_request(request, served.name, lambda: body.prompt)
    texts = split_prompts(body.prompt)
    short = sum(len(text) for text in texts) <= INLINE_PROMPT_SIZE
    prompts = (prompt_token_ids(served, texts) if short  # long prompts must not stall the loop
               else await asyncio.to_thread(prompt_token_ids, served, texts))
    max_len = served.engine.max_model_len
    max_tokens = min(completion_budget(len(ids), body.max_tokens, max_len) for ids in prompts)
    budget = max_tokens if body.max_tokens is not None else 0  # without a cap the use is settled afterwards
    samples = body.samples
    reserve_tokens(request, sum(len(ids) + samples * budget for ids in prompts))
    ranked = samples > body.n  # best_of: the n of highest cumulative logprob, which needs the chosen logprobs
    params = sampling_params(body, max_tokens=max_tokens, n=samples, prompt_logprobs=scored_prompt(body),
                             logprobs=0 if ranked and body.logprobs is None else body.logprobs)
    completion_id, created = new_id("cmpl"), now()
    echoes = [echo_text(served, text, ids) if body.echo else "" for text, ids in zip(texts, prompts)]
    outputs = recorded(record, generate_many(served.engine, prompts, params, completion_id))
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": served.name}
    if body.stream:
        return await stream_completion(request, body, outputs, head, echoes, served.engine.tokenizer)

    collected = await collect(request, outputs, samples)
    tokenizer = served.engine.tokenizer
    prompt_parts: dict[int, PromptParts] = {}  # per prompt, shared by its choices
    choices = []
    for index, prompt_index, sample in collected.best_choices(body.n) if ranked else collected.choices():
        prefix, merged = echoes[prompt_index], collected.requests[prompt_index]
        if prompt_index not in prompt_parts:
            prompt_parts[prompt_index] = PromptParts.of(body, tokenizer, merged.prompt_token_ids, merged.prompt_logprobs)
        parts = prompt_parts[prompt_index]
        logprobs = choice_logprobs(body, tokenizer, sample.logprobs or [], TextOffsets(len(prefix)), parts.echoed)
        choice = {"index": index, "text": prefix + sample.text, "logprobs": logprobs,
                  "finish_reason": sample.finish_reason}
        if parts.scored is not None:
            choice["prompt_logprobs"] = parts.scored
        choices.append(choice)
    return {**head, "choices": choices, "usage": collected.usage(), "system_fingerprint": None}


def scored_prompt(body: CompletionRequest) -> int | None:
    """Top logprobs per prompt token the engine scores: echo with logprobs shows them, prompt_logprobs asks."""
    wanted = [v for v in (body.logprobs if body.echo else None, body.prompt_logprobs) if v is not None]
    return max(wanted) if wanted else None


@dataclass(frozen=True, slots=True)
class PromptParts:
    """What a scored prompt adds to its choices, built once per prompt however many choices share it: the
    echoed prompt's logprobs block (echo with logprobs) and vLLM's `prompt_logprobs` list."""

    echoed: dict[str, Any] | None
    scored: list[dict[str, dict[str, Any]] | None] | None

    @classmethod
    def of(cls, body: CompletionRequest, tokenizer: Tokenizer, prompt_ids: list[int],
           entries: list[TokenLogprob | None] | None) -> PromptParts:
        if entries is None:
            return cls(None, None)
        echoed = None
        if body.echo and body.logprobs is not None:
            token_bytes = tokenizer.token_bytes
            special = token_bytes.special if body.skip_special_tokens else frozenset()
            echoed = echoed_logprobs(prompt_ids, entries, body.logprobs, TextOffsets(0), token_bytes,
                                     lambda t: b"" if t in special else token_bytes(t))
        scored = vllm_prompt_logprobs(entries, body.prompt_logprobs) if body.prompt_logprobs is not None else None
        return cls(echoed, scored)


def choice_logprobs(body: CompletionRequest, tokenizer: Tokenizer, entries: list[TokenLogprob], offsets: TextOffsets,
                    echoed: dict[str, Any] | None) -> dict[str, Any] | None:
    """A choice's logprobs block, led by the echoed prompt's (`echoed`, on a choice's first block) when given."""
    if body.logprobs is None:
        return None
    block = completion_logprobs(entries, body.logprobs, offsets, tokenizer.token_bytes)
    return block if echoed is None else joined_logprobs(echoed, block)


async def stream_completion(request: Request, body: CompletionRequest, outputs: Outputs, head: dict[str, Any],
                            echoes: list[str], tokenizer: Tokenizer) -> Response:
    tracker = ChoiceTracker(body.n)
    offsets: dict[int, TextOffsets] = {}  # per choice
    prompts: dict[int, PromptParts] = {}  # per scored prompt, from its first output
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
              **extra: Any) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
        return {**head, "choices": [choice], **usage_field}

    def render(prompt_index: int, output: RequestOutput) -> Iterator[dict[str, Any]]:
        if output.prompt_logprobs is not None and prompt_index not in prompts:
            prompts[prompt_index] = PromptParts.of(body, tokenizer, output.prompt_token_ids, output.prompt_logprobs)
        for delta in tracker.deltas(prompt_index, output):
            text = (echoes[prompt_index] if delta.first else "") + delta.text
            if text or delta.logprobs:
                offset = offsets.setdefault(delta.index, TextOffsets(len(echoes[prompt_index])))
                parts = prompts.get(prompt_index) if delta.first else None
                logprobs = choice_logprobs(body, tokenizer, delta.logprobs, offset,
                                          parts.echoed if parts is not None else None)
                extra = {}
                if parts is not None and parts.scored is not None:
                    extra["prompt_logprobs"] = parts.scored
                yield chunk(delta.index, text, logprobs, None, **extra)
            if delta.finish_reason:
                yield chunk(delta.index, "", None, delta.finish_reason)

    def finish() -> Iterator[dict[str, Any]]:
        if include_usage:
            yield {**head, "choices": [], "usage": tracker.usage()}

    return await stream(request, outputs, render, finish)
