"""POST /v1/completions: legacy text completion, streamed or not, for one or many prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from engine.prompt_rules import check_prompt_ids, completion_budget
from server.choices import ChoiceTracker, new_id, now
from server.errors import APIError
from server.logprobs import TextOffsets, TokenBytes, completion_logprobs
from server.protocol import CompletionRequest, split_prompts
from server.guard.http import reserve_tokens
from server.observability.request_record import note_request, recorded
from server.request_params import check_request, sampling_params
from server.responses import collect, stream
from server.served_models import ServedModel
from server.streams import generate_many
from server.tokens import encode

router = APIRouter()


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
    prompts = await asyncio.to_thread(prompt_token_ids, served, texts)  # long prompts must not stall the loop
    max_len = served.engine.max_model_len
    max_tokens = min(completion_budget(len(ids), body.max_tokens, max_len) for ids in prompts)
    budget = max_tokens if body.max_tokens is not None else 0  # without a cap the use is settled afterwards
    reserve_tokens(request, sum(len(ids) + body.n * budget for ids in prompts))
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs)
    completion_id, created = new_id("cmpl"), now()
    echoes = [echo_text(served, text, ids) if body.echo else "" for text, ids in zip(texts, prompts)]
    outputs = recorded(record, generate_many(served.engine, prompts, params, completion_id))
    head = {"id": completion_id, "object": "text_completion", "created": created, "model": served.name}
    if body.stream:
        return await stream_completion(request, body, outputs, head, echoes, served.engine.tokenizer.token_bytes)

    collected = await collect(request, outputs, body.n)
    choices = []
    for index, prompt_index, sample in collected.choices():
        prefix = echoes[prompt_index]
        logprobs = (completion_logprobs(sample.logprobs or [], body.logprobs, TextOffsets(len(prefix)),
                                        served.engine.tokenizer.token_bytes)
                    if body.logprobs is not None else None)
        choices.append({"index": index, "text": prefix + sample.text, "logprobs": logprobs,
                        "finish_reason": sample.finish_reason})
    return {**head, "choices": choices, "usage": collected.usage(), "system_fingerprint": None}


async def stream_completion(request: Request, body: CompletionRequest, outputs, head: dict[str, Any],
                            echoes: list[str], token_bytes: TokenBytes) -> Response:
    tracker = ChoiceTracker(body.n)
    offsets: dict[int, TextOffsets] = {}  # per choice
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **usage_field}

    def render(prompt_index: int, output: RequestOutput) -> Iterator[dict[str, Any]]:
        for delta in tracker.deltas(prompt_index, output):
            text = (echoes[prompt_index] if delta.first else "") + delta.text
            if text or delta.logprobs:
                logprobs = None
                if body.logprobs is not None:
                    offset = offsets.setdefault(delta.index, TextOffsets(len(echoes[prompt_index])))
                    logprobs = completion_logprobs(delta.logprobs, body.logprobs, offset, token_bytes)
                yield chunk(delta.index, text, logprobs, None)
            if delta.finish_reason:
                yield chunk(delta.index, "", None, delta.finish_reason)

    def finish() -> Iterator[dict[str, Any]]:
        if include_usage:
            yield {**head, "choices": [], "usage": tracker.usage()}

    return await stream(request, outputs, render, finish)
