"""Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`, the type following the status.

Statuses Anthropic's own API does not use keep their meaning under the nearest type
(503, an engine that cannot take the request, is `overloaded_error` like Anthropic's 529).
"""

from __future__ import annotations

from typing import Any

from server.errors import APIError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(error: APIError, message: str) -> dict[str, Any]:
    """`message` is the error's text made safe to encode (server.errors does that once for every shape)."""
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
