"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the conversation core.

`protocol` holds the request shapes, `convert` maps a request onto the core's Conversation,
`blocks` renders the core's events as content blocks and stream events, `errors` gives
Anthropic's error shape, and `routes` wires them to the engine.
"""

from server.messages.routes import router

__all__ = ["router"]
