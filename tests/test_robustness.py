"""Ways to stall or break the server (issue 23's audit), each against a live server: the attack gets a
4xx in OpenAI's shape (or is served within its limits), the engine keeps serving others, and no KV
block leaks."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from server.app import create_app
from server.cli import build_parser
from server.guard.rate_limit import Limits
from server.serving import uvicorn_config
from server.settings import ServerSettings
from server.shutdown import DrainingServer
from server_fixtures import LiveServer, free_port_socket, save_tiny_llama, wait_until_idle

pytestmark = pytest.mark.timeout(300)

GRAMMAR_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_OUTPUT_TOKENS = 400
MESSAGES = [{"role": "user", "content": "Hello"}]
LONG = {"max_tokens": 1000, "ignore_eos": True}  # runs to MAX_OUTPUT_TOKENS: hundreds of engine steps


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("robust") / "tiny", max_position_embeddings=1024)
    return AsyncEngine.from_config(EngineConfig(model=str(model_dir), served_model_name="tiny", device="cpu",
                                                dtype="float32", kernel_backend="torch", kv_cache_gib=0.02,
                                                grammar_compile_timeout_s=GRAMMAR_TIMEOUT_S,
                                                max_output_tokens=MAX_OUTPUT_TOKENS))


@pytest.fixture(scope="module")
def live(engine):
    settings = ServerSettings(body_timeout_s=BODY_TIMEOUT_S, rate_limits=Limits(max_pending=4),
                              allowed_origins=("http://allowed.example",))
    server = LiveServer(create_app({"tiny": engine}, settings))
    yield server
    server.stop()


def second_app(engine, **settings):
    """Another app on the running engine (started by `live`'s lifespan), with its own settings."""
    return create_app({"tiny": engine}, ServerSettings(**settings), manage_engines=False)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def plain_request(client) -> float:
    started = time.monotonic()
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("length", "stop")
    return time.monotonic() - started


def rss_bytes() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= set(error)
    return error


def test_slow_grammar_compile_is_a_400_naming_the_limit_and_others_are_served(live, client, engine):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                   response_format={"type": "json_object"})  # the compile worker is up
    big_enum = {"type": "object", "properties": {"x": {"enum": [f"value-{i}-{i * 7919 % 10007}"
                                                                  for i in range(10_000)]}}}
    results: list[httpx.Response] = []

    def attack() -> None:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": big_enum}}}
        results.append(httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=120))

    quiet = min(plain_request(client) for _ in range(3))
    rss_before = rss_bytes()
    attackers = [threading.Thread(target=attack) for _ in range(3)]
    started = time.monotonic()
    for thread in attackers:
        thread.start()
    time.sleep(0.2)
    under_attack = plain_request(client)
    for thread in attackers:
        thread.join(120)
    assert time.monotonic() - started < 30
    assert under_attack < 2 * quiet + 1.0  # the compiles run in worker processes, one thread each
    assert rss_bytes() - rss_before < 100 << 20  # killed compiles leave nothing behind in the server
    for response in results:
        error = assert_openai_error(response, 400)
        assert "--grammar-compile-timeout-s" in error["message"]
        assert error["param"] == "response_format.json_schema.schema"
    assert wait_until_idle(engine).kv_blocks_used == 0


def half_sent(port: int, chunked: bool) -> socket.socket:
    """A connection that sends headers and part of a body, then goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port))
    body = b'{"model": "tiny", "messages": ['
    framing = b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n" if chunked else \
        b"Content-Length: 500\r\n\r\n" + body
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing)
    return sock


def read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 10:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        pass
    return data


def test_half_sent_bodies_hold_no_slot_and_get_408(live, client, engine):
    sockets = [half_sent(live.port, chunked) for chunked in (True, False) * 3]  # more than --max-pending
    try:
        time.sleep(0.2)
        plain_request(client)  # served although six requests are open and only four slots exist
        started = time.monotonic()
        for sock in sockets:
            reply = read_response(sock, 10)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            body = json.loads(reply.split(b"\r\n\r\n", 1)[1].split(b"\r\n0\r\n")[0].strip() or b"{}") \
                if b"content-length" in reply.lower() else None
            if body is not None:
                assert "--body-timeout" in body["error"]["message"]
        assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    finally:
        for sock in sockets:
            sock.close()
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_deeply_nested_tool_arguments_are_a_400(live, client):
    nested = "[" * 5000 + "]" * 5000
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": nested}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    response = httpx.post(live.base_url + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": history, "max_tokens": 2})
    assert_openai_error(response, 400)
    deep_body = '{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = httpx.post(live.base_url + "/v1/chat/completions", content=deep_body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(response, 400)
    plain_request(client)


def test_tiny_temperatures_are_greedy(client):
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    for temperature in (1e-40, 1e-300, 1e-6):
        tiny = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=temperature)
        assert tiny.choices[0].message.content == greedy.choices[0].message.content
        assert tiny.choices[0].finish_reason == greedy.choices[0].finish_reason


def test_trailing_slash_is_a_shaped_404_not_a_redirect(live):
    response = httpx.get(live.base_url + "/v1/models/", headers={"host": "evil.example"})
    assert "location" not in response.headers
    assert_openai_error(response, 404)
    assert_openai_error(httpx.get(live.base_url + "/v1/chat/completions"), 405)


def test_refused_cors_preflight_is_openai_shaped(live):
    headers = {"origin": "http://evil.example", "access-control-request-method": "POST"}
    error = assert_openai_error(httpx.options(live.base_url + "/v1/chat/completions", headers=headers), 400)
    assert "origin" in error["message"]
    headers["origin"] = "http://allowed.example"
    assert httpx.options(live.base_url + "/v1/chat/completions", headers=headers).status_code == 200


def test_tool_message_without_call_id_is_a_400(client):
    messages = [*MESSAGES, {"role": "tool", "content": "42"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert caught.value.body["param"] == "messages.1.tool_call_id"


def test_invalid_tool_schema_is_a_400_with_tool_choice_auto(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                         "properties": {"x": {"type": "strnig"}}}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, tools=[tool], tool_choice="auto")
    assert caught.value.body["param"] == "tools.0.function.parameters"
    assert "properties.x.type" in caught.value.body["message"]


def test_max_output_tokens_caps_every_request(client, engine):
    response = client.completions.create(model="tiny", prompt="Hello", extra_body=LONG, max_tokens=1000)
    assert response.usage.completion_tokens == MAX_OUTPUT_TOKENS
    assert response.choices[0].finish_reason == "length"
    assert wait_until_idle(engine).kv_blocks_used == 0


def stream_cut_by_deadline(engine, route: str, body: dict) -> list[str]:
    """The lines of a stream that --request-timeout stopped after it had started. The stream starts with
    the first token, and a busy machine can delay that past any fixed limit (a 504 then, checked too), so
    the limit starts at 0.15 s and doubles until the stream has started by then. The generation
    (MAX_OUTPUT_TOKENS steps, ~0.5 s on a quiet machine) lasts many times its first token, so the first
    limit the stream starts within still ends it early: a stream that runs to its end fails the callers."""
    for timeout_s in (0.15 * 2**attempt for attempt in range(8)):
        server = LiveServer(second_app(engine, request_timeout_s=timeout_s))
        try:
            with httpx.stream("POST", server.base_url + route, json=body, timeout=60) as stream:
                if stream.status_code == 504:
                    assert "--request-timeout" in stream.read().decode()
                    continue
                assert stream.status_code == 200
                return [line for line in stream.iter_lines() if line]
        finally:
            server.stop()
    raise AssertionError(f"no first token within {timeout_s} s")


def test_request_timeout_is_a_504_and_frees_the_engine(engine, live):
    server = LiveServer(second_app(engine, request_timeout_s=0.2))
    try:  # 4 x MAX_OUTPUT_TOKENS tokens: seconds on any machine
        body = {"model": "tiny", "prompt": "Hello", "n": 4, **LONG}
        response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        error = assert_openai_error(response, 504)
        assert "--request-timeout" in error["message"]
    finally:
        server.stop()
    lines = stream_cut_by_deadline(engine, "/v1/completions", {**body, "stream": True})
    assert lines[-1] == "data: [DONE]" and "--request-timeout" in lines[-2]
    assert wait_until_idle(engine).kv_blocks_used == 0
    # The engine serves others (through `live`: a 0.2 s limit could stop one token on a busy machine).
    assert httpx.post(live.base_url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Hi", "max_tokens": 1}).status_code == 200


def sse_events(lines: list[str]) -> list[tuple[str, dict]]:
    """(event name, data) of a named-event SSE stream (Responses, Messages)."""
    events, name = [], ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_request_timeout_ends_responses_and_messages_streams_with_their_error_events(engine, live):
    # "z" runs greedily to MAX_OUTPUT_TOKENS (these protocols have no ignore_eos)
    responses_body = {"model": "tiny", "input": "z", "max_output_tokens": 1000, "stream": True, "temperature": 0}
    events = sse_events(stream_cut_by_deadline(engine, "/v1/responses", responses_body))
    (error_name, error), (failed_name, failed) = events[-2:]
    assert (error_name, failed_name) == ("error", "response.failed")
    assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
    assert failed["response"]["status"] == "failed"
    assert "--request-timeout" in failed["response"]["error"]["message"]

    messages_body = {"model": "tiny", "messages": [{"role": "user", "content": "z"}], "max_tokens": 1000,
                     "stream": True, "temperature": 0}
    events = sse_events(stream_cut_by_deadline(engine, "/v1/messages", messages_body))
    assert events[0][0] == "message_start"
    name, error = events[-1]
    assert name == "error" and error["error"]["type"] == "timeout_error"
    assert "--request-timeout" in error["error"]["message"]
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_streams_open_at_the_shutdown_timeout_end_with_an_error_event(engine, live, caplog):
    sock = free_port_socket()
    port = sock.getsockname()[1]
    app = second_app(engine)
    server = DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=0.3), [engine],
                            app.state.draining)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    body = {"model": "tiny", "prompt": "Hello", "n": 4, "stream": True, **LONG}
    lines: list[str] = []
    slow_body = half_sent(port, chunked=True)  # --body-timeout is 30 s here: it must not hold the shutdown up
    with caplog.at_level("WARNING", logger="minerva.server"):
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as stream:
            for line in stream.iter_lines():
                if line and not lines:
                    server.should_exit = True  # SIGTERM's effect, once the stream runs
                    stopping = time.monotonic()
                lines += [line] if line else []
        thread.join(30)
    assert time.monotonic() - stopping < 10
    assert read_response(slow_body, 5).startswith(b"HTTP/1.1 503")
    slow_body.close()
    sock.close()
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["error"]["code"] == "engine_unavailable"
    assert caplog.text.count("shutdown timeout reached") == 1
    assert wait_until_idle(engine).kv_blocks_used == 0


class LaunchedServer:
    """uvicorn run with `minerva serve`'s settings for `flags` (server.serving.uvicorn_config) on a second app."""

    def __init__(self, engine, flags: list[str], **settings) -> None:
        args = build_parser().parse_args(["serve", *flags])
        self.sock = free_port_socket()
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(second_app(engine, **settings), args))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def test_forwarded_for_is_ignored_unless_the_proxy_is_named(engine, live):
    def statuses(flags: list[str]) -> list[int]:
        server = LaunchedServer(engine, flags, rate_limits=Limits(requests_per_minute=3))
        try:
            url = f"http://127.0.0.1:{server.port}/v1/models"
            return [httpx.get(url, headers={"x-forwarded-for": f"10.0.0.{i}"}).status_code for i in range(6)]
        finally:
            server.stop()

    assert statuses([]) == [200, 200, 200, 429, 429, 429]
    assert statuses(["--forwarded-allow-ips", "127.0.0.1"]) == [200] * 6  # a named proxy's header is the client


MALFORMED = [b"NOT HTTP AT ALL\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"]
# past h11's 16 KiB, unfinished and small enough to be read whole: nothing unread when the server closes
OVERSIZED_HEAD = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 32_000


@pytest.mark.parametrize("raw, status, code", [(raw, 400, "bad_http_request") for raw in MALFORMED] +
                         [(OVERSIZED_HEAD, 431, "request_headers_too_large")])
def test_malformed_http_is_openai_shaped(engine, live, raw, status, code):
    server = LaunchedServer(engine, [])
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(raw)
            reply = read_response(sock, 10)
            while not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 %d" % status) and b"application/json" in head
        assert json.loads(body)["error"]["code"] == code
    finally:
        server.stop()
