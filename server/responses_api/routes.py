"""POST /v1/responses (streamed or not) and the stored responses' GET / input_items / DELETE routes.

The request becomes the core's conversation (translate.py), runs through `prepare` and the engine
like any chat request, and its events render as Responses items (render.py). Stored responses
belong to the caller's API key (store.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from server.conversation import Conversation, prepare
from server.errors import APIError
from server.guard.http import reserve_tokens
from server.guard.request_limits import check_message_count
from server.observability.request_record import note_request, record_of, recorded
from server.responses import collect, stream
from server.responses_api.items import canonical_items
from server.responses_api.render import ResponseRenderer, StreamEvent, new_response_id, tool_echo
from server.responses_api.request import ResponsesRequest
from server.responses_api.sealing import ReasoningSeal
from server.responses_api.store import ResponseStore, StoredResponse
from server.responses_api.translate import conversation_of, served_tools, tool_namespaces
from server.served_models import ServedModel
from server.sse import sse_named_event
from server.streams import generate_many

router = APIRouter()


@dataclass
class ResponsesState:
    """What the Responses routes share across requests: the store and the reasoning seal's key."""

    store: ResponseStore
    seal: ReasoningSeal


def state_of(request: Request) -> ResponsesState:
    state: ResponsesState = request.app.state.responses  # set by create_app
    return state


def owner_of(request: Request) -> str:
    return record_of(request).key_id or ""


def not_found(response_id: str, param: str | None = None) -> APIError:
    """Unknown, expired and another key's ids alike: a key learns nothing of others' responses."""
    return APIError(404, f"No response found with id '{response_id}'.", param=param, code="response_not_found")


def stored(request: Request, response_id: str, param: str | None = None) -> StoredResponse:
    entry = state_of(request).store.get(owner_of(request), response_id)
    if entry is None:
        raise not_found(response_id, param)
    return entry


def response_head(body: ResponsesRequest, served: ServedModel, response_id: str,
                  conversation: Conversation) -> dict[str, Any]:
    """The response's fields that echo the request (as served: skipped tools and built-in choices left out)."""
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "model": served.name,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls,
            "temperature": body.sampling_temperature, "top_p": body.sampling_top_p,
            "tool_choice": tool_choice_echo(body, conversation),
            "tools": [tool_echo(tool) for tool in conversation.tools], "max_output_tokens": body.max_output_tokens,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "text": {"format": text_format_echo(body)}, "store": body.store, "user": body.user,
            "truncation": "disabled", "background": False}


def tool_choice_echo(body: ResponsesRequest, conversation: Conversation) -> Any:
    named = conversation.named_tool
    if named is not None:
        return {"type": named.kind, "name": named.name}
    if isinstance(body.tool_choice, dict) and body.tool_choice.get("type") == "allowed_tools":
        return body.tool_choice
    return conversation.tool_choice


def text_format_echo(body: ResponsesRequest) -> dict[str, Any]:
    spec = body.text.format if body.text is not None else None
    if spec is None or spec.type == "text":
        return {"type": "text"}
    echoed = spec.model_dump(by_alias=True, exclude_none=True)
    return {"name": "response", **echoed} if spec.type == "json_schema" else echoed


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> dict[str, Any] | Response:
    served: ServedModel = request.app.state.models.resolve(body.model)
    state, owner = state_of(request), owner_of(request)
    history = stored(request, body.previous_response_id, "previous_response_id").history() \
        if body.previous_response_id else []
    new_items = canonical_items(body.input, state.seal)
    check_message_count(len(new_items), request.app.state.settings.request_limits, "input")
    items = history + new_items
    record = note_request(request, served.name, lambda: items)
    offered = served_tools(body.tools or [])
    conversation = conversation_of(body, items, offered)
    prepared = await prepare(served.engine, conversation, max_tokens=body.max_output_tokens,
                             tool_call_parser=request.app.state.settings.tool_call_parser)
    reserve_tokens(request, len(prepared.prompt) + (prepared.max_tokens if body.max_output_tokens is not None else 0))
    params = prepared.apply(SamplingParams(max_tokens=prepared.max_tokens, temperature=body.sampling_temperature,
                                           top_p=body.sampling_top_p))
    response_id = new_response_id()
    renderer = ResponseRenderer(response_head(body, served, response_id, conversation),
                                state.seal if body.wants_encrypted_reasoning else None, tool_namespaces(offered))
    events = prepared.events()
    outputs = recorded(record, generate_many(served.engine, [prepared.prompt], params, response_id))

    def finish() -> list[StreamEvent]:
        closing = renderer.complete(events.usage())
        if body.store and renderer.final is not None:
            state.store.put(owner, renderer.final, items)
        return closing

    if body.stream:
        def render(prompt_index: int, output: RequestOutput) -> list[StreamEvent]:
            return [item for step in events.step(prompt_index, output) for item in renderer.events(step.events)]

        return await stream(request, outputs, render, finish, encode=sse_named_event, on_error=renderer.fail, done="")

    collected = await collect(request, outputs, 1)
    renderer.events(events.whole(collected).get(0, []))
    finish()
    assert renderer.final is not None
    return renderer.final


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request) -> dict[str, Any]:
    return stored(request, response_id).response


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if not state_of(request).store.delete(owner_of(request), response_id):
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", response_model=None)
async def list_input_items(response_id: str, request: Request, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None) -> dict[str, Any]:
    items = stored(request, response_id).input_items
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in this response", param="after")
        ordered = ordered[ids.index(after) + 1:]
    page = ordered[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}
