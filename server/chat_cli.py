"""`minerva chat` and `minerva generate`: a model from a terminal or a script.

Both speak OpenAI's streamed chat completions to a server: the one at `--url`, or one
started in this process on a free loopback port for the MODEL given (a built-in name or a
path; none = the default model). So a terminal chat goes through exactly the code path
every client uses (chat template, stop tokens, harmony channels), and the client side
needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from server.engine_args import LaunchError, add_engine_flags, engine_config

if TYPE_CHECKING:  # the HTTP client loads with the command that uses it, not with `minerva inspect`
    from server.chat_client import ChatClient

HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


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
    from server.chat_client import ChatClient

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


def add_chat_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
