"""POST /v1/chat/completions: OpenAI's chat shape mapped onto the conversation core, streamed or not."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from engine.structured.spec import StructuredOutput
from server.choices import new_id, now
from server.conversation import (Conversation, Event, Finish, FoldedMessage, OutputEvents, PreparedPrompt,
                                 ReasoningDelta, TextDelta, Tool, ToolCallArguments, ToolCallItem, ToolCallStart,
                                 Turn, fold, prepare)
from server.errors import APIError
from server.guard.http import reserve_tokens
from server.logprobs import TokenBytes, chat_logprobs, vllm_prompt_logprobs
from server.observability.request_record import note_request, recorded
from server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice
from server.request_params import check_request, sampling_params
from server.responses import Outputs, collect, stream
from server.served_models import ServedModel
from server.streams import generate_many

router = APIRouter()


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string: text parts, and an assistant's refusal (parts or field) as its text."""
    texts = []
    if isinstance(message.content, str):
        texts.append(message.content)
    for part in message.content if isinstance(message.content, list) else []:
        kind = part.get("type")
        key = "refusal" if kind == "refusal" and message.role == "assistant" else "text" if kind == "text" else None
        if key is None or not isinstance(part.get(key), str):
            raise APIError(400, f"messages.{index}.content: unsupported content part type {kind!r}: only text (and "
                                f"an assistant's refusal) is supported", param=f"messages.{index}.content")
        texts.append(part[key])
    if message.refusal and not "".join(texts):
        texts.append(message.refusal)
    return "".join(texts)


def chat_turn(message: ChatMessage, index: int) -> Turn:
    if message.role == "tool" and not message.tool_call_id:
        raise APIError(400, f"messages.{index}.tool_call_id: a tool message must name the call it answers",
                       param=f"messages.{index}.tool_call_id")
    calls = [ToolCallItem(call.id, call.function.name, call.function.arguments,
                          param=f"messages.{index}.tool_calls.{i}.function.arguments")
             for i, call in enumerate(message.tool_calls or [])]
    return Turn(message.role, message_text(message, index), message.reasoning_content, calls,
                message.tool_call_id, message.name)


def output_format(body: ChatCompletionRequest) -> tuple[StructuredOutput | None, str]:
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None, "response_format"
    if response_format.type == "json_object":
        return StructuredOutput.json_object(), "response_format"
    assert response_format.json_schema is not None and response_format.json_schema.schema_ is not None
    return StructuredOutput.from_schema(response_format.json_schema.schema_), "response_format.json_schema.schema"


def conversation_of(body: ChatCompletionRequest) -> Conversation:
    """The chat request as the core's conversation (each piece naming its request field for errors)."""
    tools = [Tool(t.function.name, t.function.description or "", t.function.parameters, param=f"tools.{i}.function")
             for i, t in enumerate(body.tools or [])]
    choice = body.tool_choice
    tool_choice = choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"
    spec, spec_param = output_format(body)
    return Conversation([chat_turn(m, i) for i, m in enumerate(body.messages)], tools, tool_choice,
                        body.parallel_tool_calls, spec, spec_param, body.reasoning_effort, body.add_generation_prompt)


def chat_delta(event: Event) -> dict[str, Any] | None:
    """One core event as a chat chunk's delta (Finish is the chunk's finish_reason instead)."""
    if isinstance(event, TextDelta):
        return {"content": event.text}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    if isinstance(event, ToolCallStart):  # OpenAI's streamed shape: id, type and name first, arguments ""
        return {"tool_calls": [{"index": event.index, "id": event.call_id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    if isinstance(event, ToolCallArguments):
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}
    return None


def assistant_message(message: FoldedMessage) -> dict[str, Any]:
    """The non-streamed message: content None beside calls, "" when there is nothing at all."""
    rendered: dict[str, Any] = {"role": "assistant", "content": message.text or None, "refusal": None}
    if not message.tool_calls and not message.text:
        rendered["content"] = message.text
    if message.reasoning is not None:
        rendered["reasoning_content"] = message.reasoning
    if message.tool_calls:
        rendered["tool_calls"] = [{"id": call.call_id, "type": "function",
                                   "function": {"name": call.name, "arguments": call.arguments}}
                                  for call in message.tool_calls]
    return rendered


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    check_request(body, request.app.state.settings.request_limits)
    record = note_request(request, served.name, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prepared = await prepare(served.engine, conversation_of(body), max_tokens=requested,
                             tool_call_parser=request.app.state.settings.tool_call_parser)
    reserve_tokens(request, len(prepared.prompt) + body.n * (prepared.max_tokens if requested is not None else 0))
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = prepared.apply(sampling_params(body, max_tokens=prepared.max_tokens, logprobs=top,
                                            prompt_logprobs=body.prompt_logprobs))
    completion_id, created = new_id("chatcmpl"), now()
    outputs = recorded(record, generate_many(served.engine, [prepared.prompt], params, completion_id))
    token_bytes = served.engine.tokenizer.token_bytes
    if body.stream:
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "system_fingerprint": None}
        return await stream_chat(request, body, outputs, head, top, prepared, token_bytes)

    collected = await collect(request, outputs, body.n)
    events = prepared.events(body.n)
    per_choice = events.whole(collected)
    choices = []
    for index, _, sample in collected.choices():
        message = fold(per_choice.get(index, []))
        choices.append({"index": index, "message": assistant_message(message),
                        "logprobs": chat_logprobs(sample.logprobs or [], top, token_bytes) if top is not None else None,
                        "finish_reason": message.finish.reason if message.finish else sample.finish_reason})
    response = {"id": completion_id, "object": "chat.completion", "created": created, "model": served.name,
                "choices": choices, "usage": chat_usage(events), "system_fingerprint": None}
    scored = collected.requests[0].prompt_logprobs if collected.requests else None
    if body.prompt_logprobs is not None and scored is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(scored, body.prompt_logprobs)
    return response


def chat_usage(events: OutputEvents) -> dict[str, Any]:
    usage = events.usage()
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


async def stream_chat(request: Request, body: ChatCompletionRequest, outputs: Outputs, head: dict[str, Any],
                      top: int | None, prepared: PreparedPrompt, token_bytes: TokenBytes) -> Response:
    events = prepared.events(body.n)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    usage_field = {"usage": None} if include_usage else {}
    empty_delta = {"content": ""} if prepared.parser is None else {}  # a step's logprobs with no text to show

    def chunk(index: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, finish_reason: str | None
              ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**head, "choices": [choice], **usage_field}

    scored_prompt: list[dict[str, dict[str, Any]] | None] | None = None  # vLLM's prompt_logprobs, built once for all choices (one prompt)

    def render(prompt_index: int, output: RequestOutput) -> Iterator[dict[str, Any]]:
        """Deltas per event; a step's logprobs ride on its first chunk, prompt_logprobs on the stream's first."""
        nonlocal scored_prompt
        for step in events.step(prompt_index, output):
            if step.first:
                first = chunk(step.choice, {"role": "assistant", "content": ""}, None, None)
                if body.prompt_logprobs is not None and output.prompt_logprobs is not None:
                    if scored_prompt is None:
                        scored_prompt = vllm_prompt_logprobs(output.prompt_logprobs, body.prompt_logprobs)
                    first["prompt_logprobs"] = scored_prompt
                yield first
            pieces = [piece for event in step.events if (piece := chat_delta(event)) is not None]
            logprobs = chat_logprobs(step.logprobs, top, token_bytes) if top is not None and step.logprobs else None
            if logprobs is not None and not pieces:
                pieces = [empty_delta]
            for piece in pieces:
                yield chunk(step.choice, piece, logprobs, None)
                logprobs = None
            finish = next((event for event in step.events if isinstance(event, Finish)), None)
            if finish is not None:
                yield chunk(step.choice, {}, None, finish.reason)

    def finish() -> Iterator[dict[str, Any]]:
        if include_usage:
            yield {**head, "choices": [], "usage": chat_usage(events)}

    return await stream(request, outputs, render, finish)
