"""Server-sent events: `data: {json}` per chunk then `data: [DONE]` (chat, completions), or named events
whose SSE name is the event's type (Responses, Anthropic Messages)."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_data(payload: dict[str, Any]) -> str:
    """One event; compact JSON keeps per-token chunks small."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_named_event(event: dict[str, Any]) -> str:
    """One event named by its `type` (Responses and Messages streams; they end without [DONE])."""
    return f"event: {event['type']}\n{sse_data(event)}"
