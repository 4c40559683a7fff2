"""The guard in front of the routes: API keys, request rates, concurrency caps and the body size cap.

Pure ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass
through untouched and a request leaves its concurrency slot only when its
response, streamed or not, has really ended.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, send_api_error
from server.guard.keys import ApiKeys, AuthError
from server.guard.rate_limit import Admission, OverloadedError, RateLimitError
from server.observability.request_record import record_in, record_of

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses"})
TOKENIZER_ROUTES = frozenset({"/tokenize", "/detokenize"})  # outside /v1 as in vLLM, guarded all the same


def rate_limit_error(exc: RateLimitError) -> APIError:
    headers = {} if exc.retry_after is None else {"retry-after": str(exc.retry_after)}
    return APIError(429, str(exc), code="rate_limit_exceeded", headers=headers)


class GuardMiddleware:
    """Authenticates /v1 and the tokenizer routes (and, if asked, /metrics), then admits the request under
    the client's limits."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, admission: Admission, protect_metrics: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.admission = admission
        self.protect_metrics = protect_metrics

    def _guarded(self, path: str) -> bool:
        return path.startswith("/v1/") or path in TOKENIZER_ROUTES or (self.protect_metrics and path == "/metrics")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope["path"]):
            await self.app(scope, receive, send)
            return
        record = record_in(scope)
        if self.keys.enabled:
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            api_key = headers.get(b"x-api-key", b"").decode("latin-1") or None  # Anthropic's clients send this
            try:
                record.key_id = self.keys.authenticate(authorization, api_key)
            except AuthError as exc:
                await send_api_error(APIError(401, str(exc), code="invalid_api_key"), scope, receive, send)
                return
        host = (scope.get("client") or ("unknown", 0))[0]
        record.client = record.key_id or f"addr-{host}"
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_ROUTES
        try:  # a slot first, so that a refusal for concurrency or overload costs no request budget
            if generation:
                self.admission.enter(record.client)
            try:
                self.admission.check_request(record.client)
            except RateLimitError:
                if generation:
                    self.admission.leave(record.client)
                raise
        except RateLimitError as exc:
            await send_api_error(rate_limit_error(exc), scope, receive, send)
            return
        except OverloadedError as exc:
            await send_api_error(APIError(503, str(exc), code="server_overloaded", headers={"retry-after": "1"}),
                                 scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            if generation:
                self.admission.leave(record.client)
            if record.reserved_tokens is not None:
                used = record.prompt_tokens + record.completion_tokens
                self.admission.settle_tokens(record.client, record.reserved_tokens, used)


def reserve_tokens(request: Request, tokens: int) -> None:
    """Take prompt + max completion tokens from the client's per-minute budget; the guard settles the
    difference with what the request really used once it ends."""
    record = record_of(request)
    admission: Admission = request.app.state.admission
    try:
        admission.check_tokens(record.client or "local", tokens)
    except RateLimitError as exc:
        raise rate_limit_error(exc) from None
    record.reserved_tokens = tokens


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with a 413 before any route reads them.

    A declared Content-Length is checked up front; a chunked body is read up to
    the cap and then replayed to the app. (FastAPI's own max_body_size answers
    a declared oversize body in plain text, not in OpenAI's error shape.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(413, f"request body of {size} bytes is over this server's limit of {self.max_bytes} bytes",
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await send_api_error(self._too_large(declared.decode()), scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
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
