"""Production guard rails on a live loopback server: API keys, rate limits, request limits, logs and metrics.

The official openai client is the reference for what a refused call looks like
(AuthenticationError, RateLimitError); every other refusal is checked for
OpenAI's error shape and the field it names.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.guard.keys import key_id
from server.guard.rate_limit import Limits
from server.guard.request_limits import RequestLimits
from server.observability.request_log import LOGGER_NAME, JsonFormatter
from server.settings import ServerSettings
from server_fixtures import LiveServer, request_logs, save_tiny_llama, tiny_engine, wait_until_idle

PROMPT = "The quick brown fox"
# One key per test where it matters: each key may make 3 requests a minute on the `guarded` server.
KEYS = ("sk-auth", "sk-rpm", "sk-tpm", "sk-chat", "sk-conc", "sk-other", "sk-scrape", "sk-log")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("hardening") / "tiny")


@pytest.fixture(scope="module")
def guarded(model_dir):
    """Keys on, 3 requests and 300 tokens per minute per key, one request in flight per key, prompts logged."""
    settings = ServerSettings(api_keys=KEYS, protect_metrics=True, log_prompts=True,
                              rate_limits=Limits(requests_per_minute=3, tokens_per_minute=300,
                                                 max_concurrent_per_client=1))
    engine = tiny_engine(model_dir)
    server = LiveServer(create_app({"tiny": engine}, settings))
    server.engine = engine
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited(model_dir):
    """No keys; tight request limits; at most one generation in flight server-wide."""
    settings = ServerSettings(
        rate_limits=Limits(max_pending=1),
        request_limits=RequestLimits(max_body_bytes=4096, max_n=4, max_prompts=3, max_stop=2, max_stop_length=8,
                                     max_stop_token_ids=4, max_logprobs=3, max_messages=3),
    )
    engine = tiny_engine(model_dir)
    server = LiveServer(create_app({"tiny": engine}, settings))
    server.engine = engine
    yield server
    server.stop()


def client(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def start_stream(server: LiveServer, key: str | None = None, max_tokens: int = 200,
                 request_id: str | None = None) -> socket.socket:
    """A long streaming completion on a raw socket, read until its first token so it is surely running."""
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    if request_id:
        auth += f"X-Request-Id: {request_id}\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" + auth
                 + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, f"server closed the stream early: {received!r}"
        received += chunk
    return sock


# --- API keys ---------------------------------------------------------------------------------------------


def test_wrong_or_missing_keys_are_401_for_the_openai_client(guarded):
    for key in ("sk-wrong", "sk-aut", "sk-auth-"):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(guarded, key).models.list()
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(guarded, key).completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    for headers in ({}, {"authorization": "Basic sk-auth"}, {"authorization": "Bearer"},
                    {"authorization": "Bearer sk-auth extra"}, {"authorization": "sk-auth"}):
        response = httpx.get(guarded.base_url + "/v1/models", headers=headers)
        assert assert_openai_error(response, 401, code="invalid_api_key")["type"] == "authentication_error"
    assert [m.id for m in client(guarded, "sk-auth").models.list()] == ["tiny"]


def test_health_stays_open_and_metrics_can_be_protected(guarded):
    assert httpx.get(guarded.base_url + "/health").status_code == 200
    assert_openai_error(httpx.get(guarded.base_url + "/metrics"), 401)
    key = ("minerva_http_requests_total", (("route", "/v1/models"), ("status", "401")))
    before = scrape(guarded, headers={"authorization": "Bearer sk-scrape"}).get(key, 0)
    httpx.get(guarded.base_url + "/v1/models")  # refused before routing, still counted under its route
    assert scrape(guarded, headers={"authorization": "Bearer sk-scrape"})[key] == before + 1


# --- rate limits ------------------------------------------------------------------------------------------


def test_requests_per_minute_per_key_is_a_429_with_retry_after(guarded):
    rpm = client(guarded, "sk-rpm")
    for _ in range(3):
        rpm.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        rpm.models.list()
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 20  # one request refills in 60/3 s
    client(guarded, "sk-other").models.list()  # other keys keep their own budget


def test_tokens_per_minute_reserve_prompt_plus_max_tokens(guarded):
    tpm = client(guarded, "sk-tpm")
    with pytest.raises(openai.RateLimitError, match="exceed the limit of 300 tokens per minute") as caught:
        tpm.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, n=2)  # never fits: 2 x 200 + prompt
    assert "retry-after" not in caught.value.response.headers  # waiting cannot help
    done = tpm.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == 200
    with pytest.raises(openai.RateLimitError) as caught:  # ~95 left of 300, refilling 5 a second: 13 s short
        tpm.completions.create(model="tiny", prompt=PROMPT, max_tokens=250)
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_uncapped_chat_is_settled_after_the_fact_not_refused(guarded):
    """Without max_tokens the reservation would be the whole context; the prompt is reserved and the
    completion charged when it ends, so the next request waits for the debt instead."""
    chat = client(guarded, "sk-chat")
    done = chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                        extra_body={"ignore_eos": True})  # runs to the end of the context
    assert done.usage.total_tokens == 256  # the whole context, more than the 300 - 256 = 44 now left
    with pytest.raises(openai.RateLimitError) as caught:
        chat.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert int(caught.value.response.headers["retry-after"]) >= 10


def wait_until_slots_free(server: LiveServer, timeout: float = 20.0) -> None:
    """Until every generation slot is released (the server has seen the disconnects)."""
    admission = server.server.config.app.state.admission
    deadline = time.monotonic() + timeout
    while admission.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert admission.pending == 0


def test_concurrency_cap_per_key_refuses_at_once_and_costs_no_request_budget(guarded):
    sock = start_stream(guarded, "sk-conc")
    try:
        started = time.monotonic()
        for _ in range(3):  # refusals for concurrency do not spend sk-conc's 3 requests a minute
            with pytest.raises(openai.RateLimitError, match="at most 1 per client"):
                client(guarded, "sk-conc").completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
        assert time.monotonic() - started < 5
        assert client(guarded, "sk-other").completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage
    finally:
        sock.close()
    assert wait_until_idle(guarded.engine).kv_blocks_used == 0
    wait_until_slots_free(guarded)
    assert client(guarded, "sk-conc").completions.create(model="tiny", prompt=PROMPT, max_tokens=2).usage


def test_a_full_server_is_a_503_at_once(limited):
    sock = start_stream(limited)
    try:
        response = httpx.post(limited.base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert_openai_error(response, 503, code="server_overloaded")
        assert response.headers["retry-after"] == "1"
        assert httpx.get(limited.base_url + "/v1/models").status_code == 200  # only generation is capped
    finally:
        sock.close()
    assert wait_until_idle(limited.engine).kv_blocks_used == 0
    wait_until_slots_free(limited)


# --- request limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": PROMPT, "n": 5}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "n": 5, "best_of": 5}, "n"),
    ("/v1/completions", {"prompt": PROMPT, "best_of": 5}, "best_of"),  # samples per prompt over --max-n
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 4}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": "x" * 9}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["a", "x" * 9]}, "stop.1"),
    ("/v1/completions", {"prompt": PROMPT, "stop_token_ids": [1, 2, 3, 4, 5]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 4}, "logprobs"),
    ("/v1/completions", {"prompt": [5] * 300}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 4}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
])
def test_requests_over_a_limit_are_400_naming_the_field(limited, path, body, param):
    response = httpx.post(limited.base_url + path, json={"model": "tiny", **body})
    error = assert_openai_error(response, 400, param=param)
    assert error["code"] in ("limit_exceeded", "unsupported_parameter", "context_length_exceeded")


def test_bodies_over_the_size_cap_are_413_declared_or_chunked(limited):
    big = {"model": "tiny", "prompt": "word " * 2000}
    assert_openai_error(httpx.post(limited.base_url + "/v1/completions", json=big), 413, code="request_too_large")

    def chunks():
        data = json.dumps(big).encode()
        for start in range(0, len(data), 1000):
            yield data[start:start + 1000]

    chunked = httpx.post(limited.base_url + "/v1/completions", content=chunks(),
                         headers={"content-type": "application/json"})
    assert_openai_error(chunked, 413)

    def small():
        yield json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).encode()

    replayed = httpx.post(limited.base_url + "/v1/completions", content=small(),
                          headers={"content-type": "application/json"})
    assert replayed.status_code == 200 and replayed.json()["usage"]["completion_tokens"] == 2


def test_model_ids_never_reach_the_file_system(limited, model_dir, monkeypatch):
    import engine.loader
    import server.info_routes

    def forbidden(*args, **kwargs):
        raise AssertionError("a client-supplied model id reached the file system")

    monkeypatch.setattr(engine.loader, "open_model", forbidden)
    monkeypatch.setattr(engine.loader, "read_model_info", forbidden)
    monkeypatch.setattr(server.info_routes, "check_models", forbidden)
    for model in (str(model_dir), "../../../etc/passwd", "/etc/passwd", "file:///etc/passwd"):
        response = httpx.post(limited.base_url + "/v1/completions", json={"model": model, "prompt": PROMPT})
        assert_openai_error(response, 404, param="model", code="model_not_found")
        assert_openai_error(httpx.get(limited.base_url + "/v1/models/" + model.lstrip("/")), 404)
    checked = httpx.post(limited.base_url + "/v1/minerva/models/check", json={"models": [str(model_dir)]}).json()
    assert checked["results"][0]["ok"] is False


# --- logs and metrics -------------------------------------------------------------------------------------


def logged(caplog, request_id: str) -> dict:
    """The request's log line, once the server has written it."""
    found = request_logs(caplog, request_id=request_id)
    assert len(found) == 1, found
    return found[0]


def test_request_log_has_ids_tokens_and_key_id_but_never_the_key(guarded, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    raw = client(guarded, "sk-log").completions.with_raw_response.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                                                        extra_body={"ignore_eos": True})
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    fields = logged(caplog, request_id)
    assert fields["method"] == "POST" and fields["route"] == "/v1/completions" and fields["status"] == 200
    assert fields["latency_ms"] > 0 and fields["ttft_ms"] <= fields["latency_ms"]
    assert fields["prompt_tokens"] == completion.usage.prompt_tokens
    assert fields["completion_tokens"] == completion.usage.completion_tokens == 5
    assert fields["key_id"] == key_id("sk-log") and fields["model"] == "tiny"
    assert fields["prompt"] == PROMPT  # this server was started with log_prompts
    record = next(r for r in caplog.records if r.name == LOGGER_NAME and r.fields["request_id"] == request_id)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == request_id and "sk-log" not in json.dumps(line)


def test_request_log_leaves_prompts_out_by_default_and_logs_refusals_and_departures(limited, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    ok = httpx.post(limited.base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2},
                    headers={"x-request-id": "trace-ok-1"})
    refused = httpx.post(limited.base_url + "/v1/completions", json={"prompt": PROMPT, "n": 99},
                         headers={"x-request-id": "trace-bad-1"})
    assert ok.headers["x-request-id"] == "trace-ok-1" and refused.status_code == 400
    assert "prompt" not in logged(caplog, "trace-ok-1") and logged(caplog, "trace-ok-1")["completion_tokens"] == 2
    assert logged(caplog, "trace-bad-1")["status"] == 400 and "prompt_tokens" not in logged(caplog, "trace-bad-1")
    assert logged(caplog, "trace-bad-1")["error"] == {"code": "limit_exceeded", "message": refused.json()["error"]["message"]}
    assert "error" not in logged(caplog, "trace-ok-1")
    start_stream(limited, request_id="trace-gone-1").close()  # leaves mid-stream, after a 200 header
    gone = logged(caplog, "trace-gone-1")
    assert gone["status"] == 499 and 0 < gone["completion_tokens"] < 200
    wait_until_slots_free(limited)


def scrape(server: LiveServer, **kwargs) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.base_url + "/metrics", **kwargs).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_cover_traffic_latency_and_engine_state(limited):
    http = openai.OpenAI(base_url=limited.base_url + "/v1", api_key="none", max_retries=0)
    http.completions.create(model="tiny", prompt=PROMPT, max_tokens=6)
    list(http.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      stream=True))
    httpx.post(limited.base_url + "/v1/completions", json={"prompt": PROMPT, "n": 99})
    httpx.get(limited.base_url + "/no/such/route/12345")
    assert wait_until_idle(limited.engine).kv_blocks_used == 0
    samples = scrape(limited)
    names = {name for name, _ in samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("minerva_http_requests_total", route="/v1/completions", status="200") >= 1
    assert value("minerva_http_requests_total", route="/v1/completions", status="400") >= 1
    assert value("minerva_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert value("minerva_http_requests_total", route="unmatched", status="404") >= 1
    assert not any("12345" in str(labels) for _, labels in samples)
    assert value("minerva_http_request_duration_seconds_count", route="/v1/completions") >= 2
    assert value("minerva_time_to_first_token_seconds_count", model="tiny") >= 2
    assert value("minerva_time_per_output_token_seconds_count", model="tiny") >= 2
    assert value("minerva_e2e_request_latency_seconds_count", model="tiny") >= 2
    assert value("minerva_prompt_tokens_total", model="tiny") > 0
    assert value("minerva_generation_tokens_total", model="tiny") >= 10
    assert value("minerva_model_load_seconds", model="tiny") > 0
    assert value("minerva_kv_blocks_used", model="tiny") == 0 and value("minerva_kv_blocks_free", model="tiny") > 0
    for name in ("minerva_queue_length", "minerva_running_sequences", "minerva_prefix_cache_hit_rate",
                 "minerva_preemptions_total"):
        assert name in names
    if not limited.server.config.app.state.metrics.gpu.available:
        assert not any(name.startswith("minerva_gpu_") for name in names)  # absent, not errors, without a GPU
