"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, or in
the shape of the protocol its path belongs to (the app's `error_shapes`, e.g. Anthropic's under /v1/messages).

FastAPI's own 422 body and Starlette's plain-text errors never reach a client:
validation problems become 400s naming the field, unexpected exceptions become
500s logged with the request id, and the engine keeps running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, overload

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from engine.errors import EngineDeadError, InvalidRequestError
from server.observability.request_record import record_in

logger = logging.getLogger("minerva.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error a route raises on purpose; becomes the matching HTTP status with OpenAI's body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


ErrorShape = Callable[["APIError", str], dict[str, Any]]  # (error, its message made encodable) -> the body


class ClientDisconnected(Exception):
    """The client went away before its response was complete; its engine requests are already aborted."""


# nginx's "client closed request": never seen by the client, but honest in access logs.
CLIENT_CLOSED_REQUEST = 499


def engine_unavailable(exc: EngineDeadError) -> APIError:
    """The 503 for a request the engine can no longer serve (before or in the middle of its stream)."""
    return APIError(503, f"the model's engine is not running: {exc}", code="engine_unavailable")


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """Messages may quote client input; lone surrogates in it would make the JSON unencodable."""
    return {"error": {"message": encodable(message), "type": type, "param": encodable(param), "code": code}}


@overload
def encodable(text: str) -> str: ...
@overload
def encodable(text: None) -> None: ...
def encodable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def protocol_shape(scope: Scope | None) -> ErrorShape | None:
    """The error shape of the protocol whose path prefix the request is under (None: OpenAI's)."""
    app = scope.get("app") if scope is not None else None
    shapes: dict[str, ErrorShape] = getattr(getattr(app, "state", None), "error_shapes", None) or {}
    path = scope.get("path", "") if scope is not None else ""
    return next((shape for prefix, shape in shapes.items() if path == prefix or path.startswith(prefix + "/")), None)


def error_response(error: APIError, headers: dict[str, str] | None = None, scope: Scope | None = None) -> JSONResponse:
    """The error in its protocol's shape; with the request's `scope` its code and message also go into the request
    log."""
    shape = protocol_shape(scope)
    body = shape(error, encodable(error.message)) if shape else error_body(error.message, error.type, error.param,
                                                                             error.code)
    if scope is not None:
        record_in(scope).error = {"code": error.code or error.type, "message": body["error"]["message"]}
    return JSONResponse(body, status_code=error.status, headers={**error.headers, **(headers or {})})


async def send_api_error(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer from inside a pure-ASGI middleware, before any route runs."""
    await error_response(error, scope=scope)(scope, receive, send)


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"


def field_path(body: Any, loc: list[Any]) -> list[str]:
    """The parts of pydantic's error location that are the body's keys and indices: the union members it
    tried ("str", "list[int]", a model's name) are not fields, so `prompt.str` is named `prompt`."""
    path, node = [], body
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, (dict, list)) or node is None:
            if isinstance(node, dict) and isinstance(part, str) and not _member_tag(part):
                path.append(part)  # a field the body lacks (a required one): named all the same
                node = None
            continue
        else:
            continue
        path.append(str(part))
    return path


def _member_tag(part: str) -> bool:
    """pydantic's name for a union member it tried: a type ("str", "list[int]", "function-after[...]", "literal[...]")
    or a model class name."""
    return part[:1].isupper() or "[" in part or part in {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as "field: reason", and the field's dotted name as OpenAI's `param`."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = list(first.get("loc", ()))
    param = ".".join(field_path(exc.body, loc[1:] if loc[:1] == ["body"] else loc)) or None
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg', '')}", None
    message = first.get("msg", "invalid value")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, scope=request.scope)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(APIError(400, str(exc), param=exc.param, code=exc.code), scope=request.scope)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(APIError(400, message, param=param), scope=request.scope)

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:  # e.g. "[" * 5000 in tool arguments
        return error_response(APIError(400, "the request nests JSON (or schemas) too deeply to process",
                                       code="nesting_too_deep"), scope=request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else f"{phrase}: {request.url.path}"
        return error_response(APIError(exc.status_code, message), headers=getattr(exc, "headers", None),
                              scope=request.scope)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        logger.error("engine unavailable for request %s: %s", request_id_of(request), exc)
        return error_response(engine_unavailable(exc), scope=request.scope)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        logger.info("client disconnected; request %s aborted", request_id_of(request))
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_of(request)
        logger.exception("internal error in request %s", request_id, exc_info=exc)
        error = APIError(500, f"internal server error (request id {request_id})", type="server_error")
        # This handler runs outside every middleware, so it sets the request id header itself.
        return error_response(error, headers={"x-request-id": request_id}, scope=request.scope)
