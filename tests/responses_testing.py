"""Checks for Responses API bodies and streams against the official `openai` SDK's types.

Every body and every stream event is validated with the SDK's pydantic models (types nobody here
wrote); a stream is then reassembled from its deltas alone and compared with its final response.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

STREAM_EVENT = TypeAdapter(ResponseStreamEvent)
ITEM = TypeAdapter(ResponseItem)


def valid_response(body: dict[str, Any]) -> Response:
    return Response.model_validate(body)


def sse_events(text: str) -> list[dict[str, Any]]:
    """Named SSE events; each `event:` name must equal its data's type."""
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"], block
        events.append(event)
    return events


def post_stream(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post("/v1/responses", json={**body, "stream": True})
    assert response.status_code == 200, response.text
    return sse_events(response.text)


def check_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Validate every event, their order and numbering; returns the final response, which must equal the
    output reassembled from the added items and their deltas."""
    for event in events:
        STREAM_EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete", "response.failed")
    final = events[-1]["response"]
    valid_response(final)
    assert reassemble(events) == final["output"]
    return final


def reassemble(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The output items as a client builds them: each added item, grown by its deltas, closed by its done."""
    items: list[dict[str, Any]] = []
    for event in events:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert event["output_index"] == len(items)
            items.append(copy.deepcopy(event["item"]))
            continue
        if kind in ("response.created", "response.in_progress", "response.completed", "response.incomplete",
                    "response.failed", "error"):
            continue
        item = items[event["output_index"]]
        assert event.get("item_id", item["id"]) == item["id"]
        if kind == "response.content_part.added":
            assert event["content_index"] == len(item["content"])
            item["content"].append(copy.deepcopy(event["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            item["content"][event["content_index"]]["text"] += event["delta"]
        elif kind in ("response.output_text.done", "response.reasoning_text.done"):
            assert item["content"][event["content_index"]]["text"] == event["text"]
        elif kind == "response.content_part.done":
            assert item["content"][event["content_index"]] == event["part"]
        elif kind == "response.function_call_arguments.delta":
            item["arguments"] += event["delta"]
        elif kind == "response.function_call_arguments.done":
            assert item["arguments"] == event["arguments"]
        elif kind == "response.custom_tool_call_input.delta":
            item["input"] += event["delta"]
        elif kind == "response.custom_tool_call_input.done":
            assert item["input"] == event["input"]
        elif kind == "response.output_item.done":
            done = event["item"]
            grown = {key: value for key, value in item.items() if key not in ("status", "encrypted_content")}
            assert {key: value for key, value in done.items() if key not in ("status", "encrypted_content")} == grown
            items[event["output_index"]] = done
        else:
            raise AssertionError(f"unexpected event {kind}")
    return items


def without_ids(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items with what differs between two runs blanked (item and call ids, the seal's random nonce), for
    streamed == non-streamed."""
    return [{key: ("" if key in ("id", "call_id", "encrypted_content") else value) for key, value in item.items()}
            for item in output]
