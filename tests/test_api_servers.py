"""`minerva serve --api-server-count 2`: two API processes on one port against one engine core. Their faults:
an API process dying loses only its own connections (its requests are aborted in the core), the core dying
ends open streams with an error event and the server exits 1, a client leaving frees its blocks in the core,
and /metrics counts the requests of every API process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.engine_testing import tiny_llama_dir
from tests.server_fixtures import child_pids, deferred_niceness, niceness

pytestmark = pytest.mark.timeout(300)  # three processes import torch: slow on a loaded machine

BODY = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 6, "temperature": 0}


class Launched:
    def __init__(self, tmp_path: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp_path / "serve.log"
        command = [sys.executable, "-m", "server.cli", "serve", str(tiny_llama_dir()), "--api-server-count", "2",
                   "--served-model-name", "tiny", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                   "--kernel-backend", "torch", "--kv-cache-gib", "0.01", "--shutdown-timeout", "5"]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=log,
                                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 240
        while len(self.api_pids()) < 2 or not self.healthy():
            assert self.process.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def children(self, marker: bytes) -> list[int]:
        return child_pids(self.process.pid, marker)

    def api_pids(self) -> list[int]:
        return self.children(b"spawn_main")

    def stats(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()["models"]["tiny"]

    def wait_idle(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while (stats := self.stats())["num_running"] or stats["kv_blocks_used"] or stats["num_waiting"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return stats

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def launched(tmp_path):
    server = Launched(tmp_path)
    yield server
    server.close()


def completion(url: str) -> str:
    return httpx.post(url + "/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]


def first_chunk_then_leave(url: str) -> None:
    long = {**BODY, "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                return


def test_two_api_processes_serve_one_core_and_survive_each_others_death(launched):
    core = launched.children(b"engine.core_process")[0]  # the core outranks the API processes for the CPU
    assert [niceness(pid) for pid in launched.api_pids()] == [deferred_niceness(core)] * 2
    texts = {completion(launched.url) for _ in range(6)}
    assert len(texts) == 1  # greedy: the same answer whichever process took the connection
    metrics = httpx.get(launched.url + "/metrics").text
    assert 'minerva_http_requests_total{route="/v1/completions",status="200"} 6.0' in metrics  # both processes' counts

    for _ in range(4):  # clients that leave mid-stream: the abort crosses to the core and frees the blocks
        first_chunk_then_leave(launched.url)
    stats = launched.wait_idle()
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0, stats

    long = {**BODY, "max_tokens": 100_000, "ignore_eos": True, "stream": True}  # clamped to the 256-token context

    def stream() -> str:
        try:
            with httpx.stream("POST", launched.url + "/v1/completions", json=long, timeout=60) as response:
                return [line for line in response.iter_lines() if line.startswith("data: ")][-1]
        except httpx.TransportError:
            return "cut"

    with ThreadPoolExecutor(6) as pool:  # streams on both processes (the kernel spreads the connections)
        futures = [pool.submit(stream) for _ in range(6)]
        deadline = time.monotonic() + 30
        while launched.stats()["num_running"] < 6:
            assert time.monotonic() < deadline, launched.stats()
            time.sleep(0.05)
        os.kill(launched.api_pids()[0], signal.SIGKILL)
        assert completion(launched.url) == next(iter(texts))  # the other takes new requests meanwhile
        ends = [future.result() for future in futures]
    assert "data: [DONE]" in ends  # the survivor's streams finished normally
    stats = launched.wait_idle()  # the dead process's requests were aborted in the core
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0, stats
    assert "exited with status -9; 1 other(s) keep serving" in launched.log_path.read_text()
    assert len(launched.api_pids()) == 1 and launched.process.poll() is None
    assert completion(launched.url) == next(iter(texts))
    metrics = httpx.get(launched.url + "/metrics").text  # the dead process's counts are kept
    served = re.search(r'minerva_http_requests_total\{route="/v1/completions",status="200"\} (\d+)', metrics)
    assert served is not None and int(float(served.group(1))) >= 8


def test_core_death_ends_streams_with_an_error_and_the_server_exits_1(launched):
    assert completion(launched.url)
    core = launched.children(b"engine.core_process")[0]
    events = []
    long = {**BODY, "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", launched.url + "/v1/completions", json=long, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and not events:
                os.kill(core, signal.SIGKILL)
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    assert launched.process.wait(timeout=60) == 1
    log = launched.log_path.read_text()
    assert "the engine core process exited with status -9" in log and "engine stopped" in log
    assert not launched.api_pids()
