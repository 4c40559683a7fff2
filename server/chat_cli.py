"""`minerva chat` and `minerva generate`: a model from a terminal or a script.

Both speak OpenAI's streamed chat completions to a server: the one at `--url`, or one
started in this process on a free loopback port for the MODEL given (a built-in name or a
path; none = the default model). So a terminal chat goes through exactly the code path
every client uses (chat template, stop tokens, harmony channels), and the client side
needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Any
from urllib.parse import urlsplit

from engine.errors import MinervaError
from server.engine_args import LaunchError, add_engine_flags, engine_config

HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


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
    def _request(self, method: str, path: str, body: dict | None = None) -> Iterator[Any]:
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
            return json.loads(response.read())["data"][0]["id"]

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
        return json.loads(payload)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return payload.decode("utf-8", "replace")[:500]


@contextmanager
def local_server(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(base URL, served name) of MODEL served by this process on a free loopback port until the block ends."""
    import uvicorn

    from server.app import create_app
    from server.launch import build_engines

    engines = build_engines([engine_config(args, args.model, None)])
    (name,) = engines
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engines), log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise LaunchError("the in-process server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", name
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def endpoint(args: argparse.Namespace) -> Iterator[tuple[ChatClient, str]]:
    """A client and the model name to ask for: the `--url` server's (MODEL, else its first model), or a local one."""
    if args.url:
        client = ChatClient(args.url, args.api_key)
        yield client, args.model or client.first_model()
        return
    with local_server(args) as (url, name):
        yield ChatClient(url), name


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed_request}
    return {key: value for key, value in fields.items() if value is not None}


def chat_command(args: argparse.Namespace) -> int:
    """A terminal chat: the whole history goes with each turn; replies stream as they are generated."""
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    with endpoint(args) as (client, model):
        start = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(start)
        print(f"Chatting with {model} ({HELP}).", flush=True)
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if line == "/exit":
                return 0
            if line == "/reset":
                messages = list(start)
                print("(history cleared)", flush=True)
                continue
            if not line:
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            try:
                for piece in client.stream(model, messages, sampling(args)):
                    print(piece, end="", flush=True)
                    reply.append(piece)
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            print(flush=True)
            messages.append({"role": "assistant", "content": "".join(reply)})


def generate_command(args: argparse.Namespace) -> int:
    """One prompt, one reply on stdout (streamed), for scripts."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    with endpoint(args) as (client, model):
        for piece in client.stream(model, messages, sampling(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", metavar="URL", help="a running server (e.g. http://127.0.0.1:8000) instead of "
                                                     "loading MODEL in this process")
    parser.add_argument("--api-key", metavar="KEY", help="for --url servers that want one")
    parser.add_argument("--system", metavar="TEXT", help="a system message before the conversation")
    parser.add_argument("--max-tokens", type=int, metavar="N", help="longest reply (default: the context's rest)")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default: the server's)")
    parser.add_argument("--request-seed", dest="seed_request", type=int, metavar="N",
                        help="sampling seed of each request (--seed seeds the local engine)")
    add_engine_flags(parser)


def add_chat_parsers(commands: Any) -> None:
    model_help = ("built-in name (`minerva models`) or path; none = the default model; "
                  "with --url, the served name (default: the server's first)")
    chat = commands.add_parser("chat", help="chat with a model in the terminal",
                               description=f"Chat with a model in the terminal: {HELP}.")
    chat.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    _add_common(chat)
    chat.set_defaults(handler=chat_command)
    generate = commands.add_parser("generate", help="answer one prompt on stdout (for scripts)")
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument("model", nargs="?", metavar="MODEL", help=model_help)
    _add_common(generate)
    generate.set_defaults(handler=generate_command)
