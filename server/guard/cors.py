"""CORS with its refusals in OpenAI's error shape (Starlette's answers a refused preflight in plain text)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from server.errors import APIError, error_response


class ShapedCORSMiddleware(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")  # "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        return error_response(APIError(response.status_code, f"CORS preflight refused: {reason}",
                                       code="cors_refused"), headers=headers)
