"""The server under abuse, on loopback: schema fuzzing, a 200-client load-and-fault run, TLS and SIGTERM.

The fuzz pass and the load run use an in-process uvicorn on the tiny Llama; TLS
and graceful shutdown run the real `minerva serve` command in a subprocess on
the shipped default model.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine, wait_until_idle

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Minerva serves", "Paged attention keeps", "Hello world!"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("live") / "tiny"))
    server = LiveServer(create_app({"tiny": engine}))
    server.engine = engine
    yield server
    server.stop()


def assert_openai_shape(status: int, body: bytes) -> None:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], (status, body)


def assert_protocol_shape(path: str, status: int, body: bytes) -> None:
    """Anthropic's routes answer errors in Anthropic's shape, every other route in OpenAI's."""
    if not path.startswith("/v1/messages"):
        return assert_openai_shape(status, body)
    document = json.loads(body)
    assert document["type"] == "error" and set(document["error"]) == {"type", "message"}, (status, body)
    assert document["error"]["message"], (status, body)


# --- schema fuzzing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzzed_requests_never_500_and_errors_keep_openai_shape(live, mode):
    """Every operation in the served OpenAPI schema, with schema-valid and schema-violating requests."""
    schema = schemathesis.openapi.from_url(live.base_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= {op.path for op in operations}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not (len(operation.body) or len(operation.query)):
            continue  # nothing a client sends there can break the schema

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call(timeout=120)
            assert response.status_code < 500, (operation.label, response.status_code, response.content[:500])
            if response.status_code >= 400:
                assert_protocol_shape(operation.path, response.status_code, response.content)

        call()


def test_fuzzing_left_the_engine_idle(live):
    stats = wait_until_idle(live.engine, timeout=60)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0, stats


# --- load and faults --------------------------------------------------------------------------------------

INVALID_BODIES = [
    b'{"model": "tiny", "prompt": ',  # truncated JSON
    b'{"model": "tiny", "prompt": "x", "n": 0}',
    b'{"model": "no-such-model", "prompt": "x"}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": -1}',
    b'{"model": "tiny"}',
    b'{"model": "tiny", "prompt": "x", "temperature": "hot"}',
    b'[1, 2, 3]',
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def test_200_concurrent_streams_with_disconnects_and_invalid_bodies(live, capsys):
    rng = random.Random(7)
    reference = {}
    for prompt in PROMPTS:  # greedy continuations the streams must reproduce
        body = httpx.post(live.base_url + "/v1/completions", timeout=60,
                          json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}).json()
        reference[prompt] = (body["choices"][0]["text"], body["usage"]["prompt_tokens"])
    plan = []
    for i in range(200):
        if i % 10 == 0:
            plan.append(("invalid", INVALID_BODIES[(i // 10) % len(INVALID_BODIES)], 0, 0))
        else:
            kind = "disconnect" if rng.random() < 1 / 3 else "complete"
            plan.append((kind, rng.choice(PROMPTS), rng.randint(4, 24), rng.randint(0, 6)))

    async def one(http: httpx.AsyncClient, kind: str, payload, max_tokens: int, leave_after: int) -> dict:
        started = time.perf_counter()
        if kind == "invalid":
            response = await http.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
            return {"kind": kind, "status": response.status_code, "body": response.content}
        body = {"prompt": payload, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        text, usage, events, done = "", None, 0, False
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if kind == "disconnect" and events > leave_after:
                    break  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text += "".join(c["text"] for c in chunk["choices"])
        return {"kind": kind, "prompt": payload, "max_tokens": max_tokens, "text": text, "usage": usage,
                "done": done, "latency": time.perf_counter() - started}

    async def run_all() -> tuple[list[dict], float]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=120, limits=limits) as http:
            started = time.perf_counter()
            results = await asyncio.gather(*(one(http, *item) for item in plan))
            return results, time.perf_counter() - started

    results, wall = asyncio.run(run_all())

    completed = [r for r in results if r["kind"] == "complete"]
    for r in completed:
        full_text, prompt_tokens = reference[r["prompt"]]
        assert r["done"] and r["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": r["max_tokens"],
                                            "total_tokens": prompt_tokens + r["max_tokens"]}, r
        assert full_text.startswith(r["text"]) and r["text"], r
    for r in results:
        if r["kind"] == "invalid":
            assert 400 <= r["status"] < 500
            assert_openai_shape(r["status"], r["body"])
    stats = wait_until_idle(live.engine, timeout=60)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0, stats
    assert httpx.get(live.base_url + "/health").json()["status"] == "ok"
    latencies = [r["latency"] for r in completed]
    with capsys.disabled():
        print(f"\nload-and-fault: 200 requests ({len(completed)} complete, "
              f"{sum(r['kind'] == 'disconnect' for r in results)} disconnected, "
              f"{sum(r['kind'] == 'invalid' for r in results)} invalid) in {wall:.2f}s = {200 / wall:.1f} req/s; "
              f"complete-stream latency p50 {statistics.median(latencies) * 1000:.0f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.0f} ms")


# --- TLS and graceful shutdown (the real command) ---------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_file, cert_file = directory / "key.pem", directory / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`minerva serve tiny-gpt-oss` (the fast built-in test model) over HTTPS in a subprocess, its stderr kept in a file."""

    def __init__(self, directory: Path, shutdown_timeout: float) -> None:
        self.key, self.cert = self_signed_certificate(directory)
        self.port = free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.log_path = directory / f"serve-{self.port}.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "server.cli", "serve", "tiny-gpt-oss", "--device", "cpu", "--port", str(self.port),
                   "--ssl-keyfile", str(self.key), "--ssl-certfile", str(self.cert),
                   "--shutdown-timeout", str(shutdown_timeout)]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 180
        while True:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.base_url + "/health", verify=str(self.cert), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, verify=str(self.cert), timeout=120)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.kill()
        code = self.process.wait(timeout=30)
        self._log.close()
        return code

    def json_logs(self) -> list[dict]:
        lines = [line for line in self.log_path.read_text().splitlines() if line.startswith("{")]
        return [json.loads(line) for line in lines]


def stream_in_thread(server: ServeProcess, max_tokens: int) -> tuple[threading.Thread, dict, threading.Event]:
    """Stream a long completion in a thread; `started` is set at the first token."""
    result: dict = {"events": [], "error": None}
    started = threading.Event()

    def run() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with server.client() as http, http.stream("POST", "/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        result["events"].append(line[6:])
                        started.set()
        except httpx.HTTPError as exc:
            result["error"] = exc
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result, started


def test_tls_and_sigterm_lets_a_running_stream_finish_then_exits_0(tmp_path):
    server = ServeProcess(tmp_path, shutdown_timeout=60)
    try:
        with pytest.raises(httpx.ConnectError):  # the certificate is checked: an unknown issuer fails
            httpx.get(server.base_url + "/health", timeout=5)
        with server.client() as http:
            ok = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, headers={"x-request-id": "tls-1"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 4
        thread, result, started = stream_in_thread(server, max_tokens=400)  # ~2 s of decoding left
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections once shutting down
            httpx.get(server.base_url + "/health", verify=str(server.cert), timeout=5)
        thread.join(timeout=90)
        assert result["error"] is None, result["error"]
        assert result["events"][-1] == "[DONE]"
        usage = json.loads(result["events"][-2])["usage"]
        assert usage["completion_tokens"] == 400
        assert server.process.wait(timeout=60) == 0
    finally:
        code = server.stop()
    assert code == 0
    logs = {entry.get("request_id"): entry for entry in server.json_logs()}
    assert logs["tls-1"]["status"] == 200 and logs["tls-1"]["route"] == "/v1/completions"
    assert "prompt" not in logs["tls-1"]


def test_sigterm_ends_what_outlasts_the_shutdown_timeout_with_an_error_event_and_exits_0(tmp_path):
    server = ServeProcess(tmp_path, shutdown_timeout=1)
    try:
        thread, result, started = stream_in_thread(server, max_tokens=480)
        assert started.wait(60)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - signalled < 20
        thread.join(timeout=30)
        assert result["error"] is None and result["events"][-1] == "[DONE]"  # ended in-band, not cut off
        assert json.loads(result["events"][-2])["error"]["code"] == "engine_unavailable"
    finally:
        server.stop()
