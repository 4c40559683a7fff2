"""uvicorn's HTTP/1.1 protocol (h11) with its own 400s (bad framing, oversized headers) in OpenAI's error shape:
uvicorn writes them in plain text, before any middleware of ours could see the request."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.errors import error_body


class ShapedH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(f"malformed HTTP request: {msg}", "invalid_request_error",
                                     code="bad_http_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
