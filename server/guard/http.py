"""The guard in front of the routes: API keys, then (once server/guard/body.py has read the body)
request rates and concurrency caps.

Pure ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass
through untouched and a request leaves its concurrency slot only when its
response, streamed or not, has really ended.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import APIError, send_api_error
from server.guard.keys import ApiKeys, AuthError
from server.guard.rate_limit import Admission, OverloadedError, RateLimitError
from server.observability.request_record import record_in, record_of

GENERATION_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/messages", "/v1/responses"})
TOKENIZER_ROUTES = frozenset({"/tokenize", "/detokenize"})  # outside /v1 as in vLLM, guarded all the same


def rate_limit_error(exc: RateLimitError) -> APIError:
    headers = {} if exc.retry_after is None else {"retry-after": str(exc.retry_after)}
    return APIError(429, str(exc), code="rate_limit_exceeded", headers=headers)


class _Guarded:
    """The paths the guard covers: /v1, the tokenizer routes, and /metrics when asked."""

    def __init__(self, app: ASGIApp, protect_metrics: bool) -> None:
        self.app = app
        self.protect_metrics = protect_metrics

    def _guarded(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        path = scope["path"]
        return path.startswith("/v1/") or path in TOKENIZER_ROUTES or (self.protect_metrics and path == "/metrics")


class AuthMiddleware(_Guarded):
    """Authenticates the guarded paths; nothing else runs (no body is read) for a request without a valid key."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, protect_metrics: bool = False) -> None:
        super().__init__(app, protect_metrics)
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._guarded(scope):
            await self.app(scope, receive, send)
            return
        record = record_in(scope)
        if self.keys.enabled:
            headers = Headers(scope=scope)
            authorization = headers.get("authorization") or None
            api_key = headers.get("x-api-key") or None  # Anthropic's clients send this
            try:
                record.key_id = self.keys.authenticate(authorization, api_key)
            except AuthError as exc:
                await send_api_error(APIError(401, str(exc), code="invalid_api_key"), scope, receive, send)
                return
        host = (scope.get("client") or ("unknown", 0))[0]
        record.client = record.key_id or f"addr-{host}"
        await self.app(scope, receive, send)


class AdmissionMiddleware(_Guarded):
    """Admits an authenticated request, body already read, under its client's limits: a generation
    request holds a concurrency slot until its response, streamed or not, has really ended."""

    def __init__(self, app: ASGIApp, admission: Admission, protect_metrics: bool = False) -> None:
        super().__init__(app, protect_metrics)
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._guarded(scope):
            await self.app(scope, receive, send)
            return
        record = record_in(scope)
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
