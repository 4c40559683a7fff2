"""One place where every HTTP request ends: its Prometheus samples and its JSON log line.

Pure ASGI, outside the guard, so refused requests (401, 413, 429) are counted
and logged too; a streamed response is recorded when its last byte has gone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import CLIENT_CLOSED_REQUEST
from server.observability.metrics import Metrics
from server.observability.request_log import log_request
from server.observability.request_record import RequestRecord, record_in


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route's path pattern (a bounded label set), or "unmatched".

    The router leaves the route it ran in the scope; a request refused before
    routing (401, 413, 429) is matched against the app's routes here.
    """
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", "unmatched")


def log_fields(scope: Scope, record: RequestRecord, status: int, latency: float, log_prompts: bool) -> dict[str, object]:
    fields = {
        "request_id": scope.get("state", {}).get("request_id"),
        "method": scope["method"],
        "route": scope["path"],
        "status": status,
        "latency_ms": round(latency * 1000, 2),
        "client": record.client or None,
        "key_id": record.key_id,
    }
    if record.generated_on is not None:
        fields.update(model=record.model, prompt_tokens=record.prompt_tokens,
                      completion_tokens=record.completion_tokens)
        drafted, accepted = record.spec_tokens
        if drafted:
            fields.update(spec_draft_tokens=drafted, spec_accepted_tokens=accepted)
        if record.first_token_at is not None:
            fields["ttft_ms"] = round((record.first_token_at - record.started) * 1000, 2)
    if record.error is not None:
        fields["error"] = record.error
    if log_prompts and record.prompt is not None:
        fields["prompt"] = record.prompt
    return fields


class ObservabilityMiddleware:
    """Records every HTTP request once it has ended; `routes` are the app's own (its `routes`
    attribute wraps included routers in objects that hide the route patterns)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute], log_prompts: bool = False) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = record_in(scope)
        status: int | None = None
        complete = False

        async def send_and_note_status(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_and_note_status)
        except Exception:  # Starlette's outermost handler turns it into a 500 after us
            failed = True
            raise
        finally:
            if failed and status is None:
                final = 500
            elif complete and status is not None:  # a complete response has started, so it has a status
                final = status
            else:  # the client left before the response (or the rest of its stream) went out
                final = CLIENT_CLOSED_REQUEST
            self.record(scope, record, final)

    def record(self, scope: Scope, record: RequestRecord, status: int) -> None:
        latency = time.monotonic() - record.started
        route = route_template(scope, self.routes)
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_latency.labels(route).observe(latency)
        model = record.generated_on
        if model is not None:
            ttft = None if record.first_token_at is None else record.first_token_at - record.started
            self.metrics.observe_generation(model, record.longest_sample, ttft, latency)
        log_request(log_fields(scope, record, status, latency, self.log_prompts))
