"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from server.choices import ChoiceTracker, new_id, now
from server.errors import APIError
from server.logprobs import chat_logprobs
from server.protocol import ChatCompletionRequest, ChatMessage
from server.guard.http import reserve_tokens
from server.observability.request_record import note_request, recorded
from server.request_params import check_request, resolve_max_tokens, sampling_params
from server.responses import collect, stream
from server.served_models import ServedModel
from server.streams import generate_many
from server.tokens import encode

router = APIRouter()

# Architectures whose chat templates know the `developer` role; elsewhere it is sent as `system`.
DEVELOPER_ROLE_ARCHITECTURES = frozenset({"gpt_oss"})


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string; only text parts are accepted."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"unsupported content part type {part.get('type')!r}: only text is supported",
                           param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def render_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    tokenizer = served.engine.tokenizer
    if not tokenizer.has_chat_template:
        raise APIError(400, f"model {served.name} has no chat template; use /v1/completions", param="messages")
    keep_developer = served.engine.model_info.architecture in DEVELOPER_ROLE_ARCHITECTURES
    messages = []
    for index, message in enumerate(body.messages):
        role = message.role
        if role == "developer" and not keep_developer:
            role = "system"
        if role == "tool":
            raise APIError(400, "tool messages are not supported", param=f"messages.{index}.role")
        messages.append({"role": role, "content": message_text(message, index)})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc
    return encode(tokenizer, text, add_special_tokens=False, param="messages")


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    check_request(body, request.app.state.settings.request_limits)
    record = note_request(request, served.name, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    prompt = await asyncio.to_thread(render_prompt, served, body)  # templates + tokenizing stay off the loop
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(len(prompt), requested, served.engine.max_model_len, param)
    reserve_tokens(request, len(prompt) + body.n * (max_tokens if requested is not None else 0))  # else settled after
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=top)
    completion_id, created = new_id("chatcmpl"), now()
    outputs = recorded(record, generate_many(served.engine, [prompt], params, completion_id))
    if body.stream:
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "system_fingerprint": None}
        return await stream_chat(request, body, outputs, head, top)

    collected = await collect(request, outputs, body.n)
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": sample.text, "refusal": None},
            "logprobs": chat_logprobs(sample.logprobs or [], top) if top is not None else None,
            "finish_reason": sample.finish_reason,
        }
        for index, _, sample in collected.choices()
    ]
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.name,
            "choices": choices, "usage": collected.usage(), "system_fingerprint": None}


async def stream_chat(request: Request, body: ChatCompletionRequest, outputs, head: dict[str, Any],
                      top: int | None) -> Response:
    tracker = ChoiceTracker(body.n)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **usage_field}

    def render(prompt_index: int, output: RequestOutput) -> Iterator[dict[str, Any]]:
        for delta in tracker.deltas(prompt_index, output):
            if delta.first:
                yield chunk(delta.index, {"role": "assistant", "content": ""}, None, None)
            if delta.text or delta.logprobs:
                logprobs = chat_logprobs(delta.logprobs, top) if top is not None else None
                yield chunk(delta.index, {"content": delta.text}, logprobs, None)
            if delta.finish_reason:
                yield chunk(delta.index, {}, None, delta.finish_reason)

    def finish() -> Iterator[dict[str, Any]]:
        if include_usage:
            yield {**head, "choices": [], "usage": tracker.usage()}

    return await stream(request, outputs, render, finish)
