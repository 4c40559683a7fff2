"""uvicorn's HTTP/1.1 protocol (h11) with its own errors (bad framing: 400, a request head over h11's size
limit: 431) in OpenAI's error shape: uvicorn writes them in plain text, before any middleware of ours could
see the request."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from server.errors import error_body


class ShapedH11Protocol(H11Protocol):
    def head_limit(self) -> int:
        """The bytes h11 buffers waiting for a whole request head (uvicorn's --h11-max-incomplete-event-size)."""
        return self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for every h11 error; h11 only stops at its size limit waiting for a head
        (a body arrives in pieces), so a buffer over the limit is an oversized head."""
        if len(self.conn.trailing_data[0]) > self.head_limit():
            status, reason = 431, b"Request Header Fields Too Large"
            body = error_body(f"the request's headers are larger than this server's limit of {self.head_limit()} "
                              "bytes", "invalid_request_error", code="request_headers_too_large")
        else:
            status, reason = 400, b"Bad Request"
            body = error_body(f"malformed HTTP request: {msg}", "invalid_request_error", code="bad_http_request")
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=reason), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
