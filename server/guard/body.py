"""Reads a request's whole body, under a size cap and a deadline, before the request may take a slot.

A body that never finishes (half a chunked body, a Content-Length never reached) used to take
its admission slot first and wait forever: 1,024 such connections, no key needed, made every
generation request a 503, and they stretched SIGTERM to the full shutdown timeout (issue 23,
audit 3). Here such a request gets a 408 once `timeout_s` has passed, holding nothing meanwhile
(a 503 as soon as the server starts shutting down, so it does not hold the shutdown up either);
an oversize one a 413 (FastAPI's own cap answers in plain text, not in OpenAI's shape).
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_api_error


class BodyReader:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float, draining: asyncio.Event) -> None:
        """`draining`: set when the server starts shutting down; a body still arriving then is a 503."""
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.draining = draining

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"request body of {size} bytes is over this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    def _too_slow(self) -> APIError:
        return APIError(408, f"the request body did not arrive within {self.timeout_s:g} s (--body-timeout)",
                        code="request_timeout")

    async def _next(self, receive: Receive, timeout: float) -> Message | APIError:
        """The next body message, or the error to answer with: too slow, or the server is shutting down."""
        if self.draining.is_set():
            return _shutting_down()
        message = asyncio.ensure_future(receive())
        draining = asyncio.ensure_future(self.draining.wait())
        done, _ = await asyncio.wait({message, draining}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        draining.cancel()
        if message in done:
            return message.result()
        message.cancel()
        return _shutting_down() if draining in done else self._too_slow()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_api_error(self._too_large(declared), scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body = bytearray()
        while True:
            message = await self._next(receive, max(0.0, deadline - loop.time()))
            if isinstance(message, APIError):
                await send_api_error(message, scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await send_api_error(self._too_large(f"more than {self.max_bytes}"), scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")
