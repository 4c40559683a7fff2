"""--request-timeout: a generation request still running after `timeout_s` is cancelled, which aborts its
engine requests (their KV blocks go back to the pool), and answered with a 504, or, if its stream has
already started, ended with the error event of the stream's own protocol (OpenAI's error chunk and
`[DONE]`, Responses' `error` and `response.failed`, Anthropic's `error`), as server/responses.stream writes it.

Without it a `max_tokens: 1e9` request, clamped to the context, held its slot for 10+ minutes on CPU
(issue 23, audit 10).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_api_error
from server.guard.http import GENERATION_ROUTES
from server.responses import STREAM_ERROR_TAIL


class RequestDeadline:
    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    def _error(self) -> APIError:
        return APIError(504, f"the request ran longer than this server's limit of {self.timeout_s:g} s "
                             "(--request-timeout) and was stopped", code="request_timeout", type="timeout_error")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        started: dict[str, bool] = {"response": False, "sse": False, "ended": False}

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                started["sse"] = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                started["ended"] = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracked), self.timeout_s)
        except TimeoutError:
            if not started["response"]:
                await send_api_error(self._error(), scope, receive, send)
            elif not started["ended"]:
                error_tail = scope.get("state", {}).get(STREAM_ERROR_TAIL) if started["sse"] else None
                tail = error_tail(self._error()).encode() if error_tail is not None else b""
                await send({"type": "http.response.body", "body": tail, "more_body": False})
