"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API mapped onto the conversation core.

Anthropic clients authenticate with `x-api-key` (the guard takes it beside `Authorization`) and send
`anthropic-version` / `anthropic-beta` headers and `?beta=true`, none of which changes what is served.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.conversation import OutputEvents, PreparedPrompt, prepare, render_prompt
from server.errors import APIError, encodable
from server.guard.http import reserve_tokens
from server.guard.request_limits import check_message_count, check_stops
from server.messages.blocks import ContentBlocks, StreamEvent, anthropic_usage
from server.messages.convert import conversation_of
from server.messages.errors import anthropic_error_body
from server.messages.protocol import CountTokensRequest, MessagesRequest
from server.observability.request_record import note_request, recorded
from server.responses import Outputs, collect, stream
from server.served_models import ServedModel
from server.sse import sse_named_event
from server.streams import generate_many

router = APIRouter()


def sampling_params(body: MessagesRequest, prepared: PreparedPrompt) -> SamplingParams:
    """Anthropic's defaults where the request leaves a field out: temperature 1, no top_p or top_k."""
    return prepared.apply(SamplingParams(
        max_tokens=prepared.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=0 if body.top_k is None else body.top_k,
        stop=list(body.stop_sequences or []),
    ))


@router.post("/v1/messages", response_model=None)
async def create_message(body: MessagesRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    settings = request.app.state.settings
    check_message_count(len(body.messages), settings.request_limits)
    check_stops(body.stop_sequences or [], "stop_sequences", settings.request_limits)
    record = note_request(request, served.name, lambda: [m.model_dump(exclude_none=True) for m in body.messages])
    prepared = await prepare(served.engine, conversation_of(body), max_tokens=body.max_tokens,
                             tool_call_parser=settings.tool_call_parser)
    reserve_tokens(request, len(prepared.prompt) + prepared.max_tokens)
    message_id = f"msg_{uuid.uuid4().hex}"
    outputs = recorded(record, generate_many(served.engine, [prepared.prompt], sampling_params(body, prepared),
                                             message_id))
    head = {"id": message_id, "type": "message", "role": "assistant", "model": served.name}
    if body.stream:
        return await stream_message(request, outputs, prepared, head)
    collected = await collect(request, outputs, 1)
    events = prepared.events()
    blocks = ContentBlocks()
    for event in events.whole(collected).get(0, []):
        blocks.add(event)
    return message(head, blocks, events)


def message(head: dict[str, Any], blocks: ContentBlocks, events: OutputEvents) -> dict[str, Any]:
    stop_reason, stop_sequence = blocks.stop_reason()
    return {**head, "content": blocks.content(), "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": anthropic_usage(events.usage())}


def error_events(error: APIError) -> list[StreamEvent]:
    return [anthropic_error_body(error, encodable(error.message) or "")]


async def stream_message(request: Request, outputs: Outputs, prepared: PreparedPrompt,
                         head: dict[str, Any]) -> Response:
    """message_start and a ping, the blocks' events as they come, then message_delta (stop reason, usage) and
    message_stop."""
    events = prepared.events()
    blocks = ContentBlocks()
    started = False

    def render(prompt_index: int, output: RequestOutput) -> Iterator[StreamEvent]:
        nonlocal started
        steps = events.step(prompt_index, output)
        if not started:
            started = True
            opening = {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": anthropic_usage(events.usage())}
            yield {"type": "message_start", "message": opening}
            yield {"type": "ping"}
        for step in steps:
            for event in step.events:
                yield from blocks.add(event)

    def finish() -> Iterator[StreamEvent]:
        yield from blocks.close()
        stop_reason, stop_sequence = blocks.stop_reason()
        yield {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": anthropic_usage(events.usage())}
        yield {"type": "message_stop"}

    return await stream(request, outputs, render, finish, encode=sse_named_event, on_error=error_events, done="")


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict[str, int]:
    """The prompt tokens a Messages request with these messages, system text and tools would take."""
    served: ServedModel = request.app.state.models.resolve(body.model)
    check_message_count(len(body.messages), request.app.state.settings.request_limits)
    prompt = await asyncio.to_thread(render_prompt, served.engine, conversation_of(body))
    return {"input_tokens": len(prompt)}
