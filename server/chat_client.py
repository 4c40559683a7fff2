"""A streaming OpenAI chat-completions client on the standard library (http.client), for `minerva chat`
and `generate`: the CLI needs no HTTP package beyond what Python ships."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Any
from urllib.parse import urlsplit

from engine.errors import MinervaError


class ClientError(MinervaError):
    """The server could not be reached or refused the request; the message is the server's."""


class ChatClient:
    """Streamed chat completions against one OpenAI-compatible base URL (`http://host:port`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError(f"--url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url, self.timeout = url, timeout
        self._connection_class = HTTPSConnection if parts.scheme == "https" else HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/").removesuffix("/v1")
        self._headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"

    @contextmanager
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Iterator[Any]:
        connection = self._connection_class(self._host, self._port, timeout=self.timeout)
        try:
            connection.request(method, self._prefix + path, body=None if body is None else json.dumps(body),
                               headers=self._headers)
            response = connection.getresponse()
            if response.status != 200:
                raise ClientError(f"{self.url} answered {response.status}: {_error_message(response.read())}")
            yield response
        except (OSError, HTTPException) as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from exc
        finally:
            connection.close()  # leaving early (Ctrl-C) drops the connection: the server aborts the request

    def first_model(self) -> str:
        with self._request("GET", "/v1/models") as response:
            return str(json.loads(response.read())["data"][0]["id"])

    def stream(self, model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> Iterator[str]:
        """The reply's text as it is generated."""
        body = {"model": model, "messages": messages, "stream": True, **sampling}
        with self._request("POST", "/v1/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ClientError(chunk["error"].get("message", "the server failed the request"))
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        yield choice["delta"]["content"]


def _error_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return payload.decode("utf-8", "replace")[:500]
