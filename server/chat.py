"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from engine.prompt_rules import completion_budget
from server.chat_tools import ToolCallStream, assistant_message, finish_reason, parse_completion, tool_parser_for
from server.choices import ChoiceDelta, ChoiceTracker, new_id, now
from server.errors import APIError
from server.logprobs import chat_logprobs
from server.harmony import HarmonyParser, HarmonyStream, constrained_header, render_harmony, uses_harmony
from server.protocol import ChatCompletionRequest, ChatMessage, MessageToolCall
from server.guard.http import reserve_tokens
from server.observability.request_record import note_request, recorded
from server.request_params import check_request, sampling_params
from server.responses import collect, stream
from server.served_models import ServedModel
from server.streams import generate_many
from server.structured_output import compile_constraint
from server.tool_parsers import ToolParser
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


def call_arguments(call: MessageToolCall, param: str) -> dict[str, Any]:
    """Templates write arguments with `| tojson`, so they get the object, not the JSON text."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as exc:
        raise APIError(400, f"tool call arguments are not valid JSON: {exc}", param=param) from exc
    if not isinstance(arguments, dict):
        raise APIError(400, "tool call arguments must be a JSON object", param=param)
    return arguments


def template_message(message: ChatMessage, index: int, keep_developer: bool) -> dict[str, Any]:
    """A message as HF chat templates expect it: tool calls with object arguments, tool results with their id."""
    role = "system" if message.role == "developer" and not keep_developer else message.role
    rendered: dict[str, Any] = {"role": role, "content": message_text(message, index)}
    if message.name is not None:
        rendered["name"] = message.name
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name,
                          "arguments": call_arguments(call, f"messages.{index}.tool_calls.{i}.function.arguments")}}
            for i, call in enumerate(message.tool_calls)]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def render_prompt(served: ServedModel, body: ChatCompletionRequest) -> list[int]:
    tokenizer = served.engine.tokenizer
    if uses_harmony(served.engine.model_info.architecture, tokenizer):
        texts = [message_text(message, i) for i, message in enumerate(body.messages)]
        return render_harmony(body, texts) + constrained_header(body)
    if not tokenizer.has_chat_template:
        raise APIError(400, f"model {served.name} has no chat template; use /v1/completions", param="messages")
    keep_developer = served.engine.model_info.architecture in DEVELOPER_ROLE_ARCHITECTURES
    messages = [template_message(message, index, keep_developer) for index, message in enumerate(body.messages)]
    extra: dict[str, Any] = {}
    if body.tool_mode != "none":
        extra["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    if body.reasoning_effort is not None:
        extra["reasoning_effort"] = body.reasoning_effort
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, **extra)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages") from exc
    return encode(tokenizer, text, add_special_tokens=False, param="messages")


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    check_request(body, request.app.state.settings.request_limits)
    record = note_request(request, served.name, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    prompt = await asyncio.to_thread(render_prompt, served, body)  # templates + tokenizing stay off the loop
    constraint = await compile_constraint(served.engine, body)
    engine = served.engine
    harmony = uses_harmony(engine.model_info.architecture, engine.tokenizer)
    parser = (HarmonyParser() if harmony and body.tool_mode in ("none", "auto") else
              tool_parser_for(body, engine.tokenizer.chat_template, request.app.state.settings.tool_call_parser))
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = completion_budget(len(prompt), requested, served.engine.max_model_len, param="messages")
    reserve_tokens(request, len(prompt) + body.n * (max_tokens if requested is not None else 0))  # else settled after
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=top)
    params.structured = constraint
    if parser is not None and parser.needs_special_tokens:
        params.skip_special_tokens = False  # the call markers are special tokens
    completion_id, created = new_id("chatcmpl"), now()
    outputs = recorded(record, generate_many(served.engine, [prompt], params, completion_id))
    if body.stream:
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "system_fingerprint": None}
        return await stream_chat(request, body, outputs, head, top, parser)

    collected = await collect(request, outputs, body.n)
    choices = []
    for index, _, sample in collected.choices():
        message: dict[str, Any] = {"role": "assistant", "content": sample.text, "refusal": None}
        reason = sample.finish_reason
        if parser is not None:
            parsed = parse_completion(parser, sample.text, body.parallel_tool_calls)
            message, reason = assistant_message(parsed), finish_reason(parser, parsed, reason)
        choices.append({"index": index, "message": message,
                        "logprobs": chat_logprobs(sample.logprobs or [], top) if top is not None else None,
                        "finish_reason": reason})
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": served.name,
            "choices": choices, "usage": collected.usage(), "system_fingerprint": None}


async def stream_chat(request: Request, body: ChatCompletionRequest, outputs, head: dict[str, Any],
                      top: int | None, parser: ToolParser | None) -> Response:
    tracker = ChoiceTracker(body.n)
    tool_streams: dict[int, ToolCallStream | HarmonyStream] = {}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **usage_field}

    def render(prompt_index: int, output: RequestOutput) -> Iterator[dict[str, Any]]:
        for delta in tracker.deltas(prompt_index, output):
            if delta.first:
                yield chunk(delta.index, {"role": "assistant", "content": ""}, None, None)
            if parser is not None:
                yield from render_tools(delta)
                continue
            if delta.text or delta.logprobs:
                logprobs = chat_logprobs(delta.logprobs, top) if top is not None else None
                yield chunk(delta.index, {"content": delta.text}, logprobs, None)
            if delta.finish_reason:
                yield chunk(delta.index, {}, None, delta.finish_reason)

    def render_tools(delta: ChoiceDelta) -> Iterator[dict[str, Any]]:
        """Content and tool-call deltas; logprobs ride on the first chunk of the step that produced them."""
        assert parser is not None
        if delta.index not in tool_streams:
            tool_streams[delta.index] = (HarmonyStream(parser, body.parallel_tool_calls)
                                         if isinstance(parser, HarmonyParser) else
                                         ToolCallStream(parser, body.parallel_tool_calls))
        tools = tool_streams[delta.index]
        pieces = tools.feed(delta.text)
        reason = delta.finish_reason
        if reason:
            more, parsed = tools.finish()
            pieces, reason = pieces + more, finish_reason(parser, parsed, reason)
        logprobs = chat_logprobs(delta.logprobs, top) if top is not None and delta.logprobs else None
        if logprobs is not None and not pieces:
            pieces = [{}]
        for piece in pieces:
            yield chunk(delta.index, piece, logprobs, None)
            logprobs = None
        if reason:
            yield chunk(delta.index, {}, None, reason)

    def finish() -> Iterator[dict[str, Any]]:
        if include_usage:
            yield {**head, "choices": [], "usage": tracker.usage()}

    return await stream(request, outputs, render, finish)
