"""`minerva serve --tensor-parallel-size 2 --device cpu` against the openai client: the same answers as one
rank (streamed and not, completions and chat), the group's KV capacity on /v1/models and /metrics, and a
killed worker rank ending in-flight streams with a 503 error and the server exiting non-zero, bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.tp_fixtures import save_tp_model

REPO = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT_S = 5


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`minerva serve MODEL --config FILE [--tensor-parallel-size N]` in a subprocess, its output in a file."""

    def __init__(self, model: Path, config: Path, log_dir: Path, tp: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"serve-tp{tp}.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "server.cli", "serve", str(model), "--config", str(config),
                   "--port", str(self.port), "--served-model-name", "tiny", "--shutdown-timeout", "5"]
        if tp > 1:
            command += ["--tensor-parallel-size", str(tp)]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def workers(self) -> list[int]:
        """Pids of the spawned tensor-parallel ranks (processes running multiprocessing's spawn_main under the
        server: its children, or its engine core process's)."""
        parents, commands = {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
        under = {self.process.pid} | {pid for pid, ppid in parents.items() if ppid == self.process.pid}
        return [pid for pid, ppid in parents.items() if ppid in under and pid != self.process.pid
                and "spawn_main" in commands.get(pid, "") and "resource_tracker" not in commands.get(pid, "")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tp-serve")
    model, _ = save_tp_model("llama-kv2", directory / "model")
    config = directory / "engine.toml"
    config.write_text('[engine]\ndevice = "cpu"\ndtype = "float32"\nkernel_backend = "torch"\n'
                      f"kv_cache_gib = 0.01\ntensor_parallel_timeout_s = {COLLECTIVE_TIMEOUT_S}\n")
    started = {tp: Server(model, config, directory, tp) for tp in (1, 2)}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def answers(server: Server) -> dict:
    client = server.client()
    plain = client.completions.create(model="tiny", prompt="the cat sat on", max_tokens=12, temperature=0)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="tiny", prompt="a house by the", max_tokens=12, temperature=0, stream=True) if chunk.choices)
    chat = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=10, temperature=0,
        stream=True) if chunk.choices)
    return {"plain": (plain.choices[0].text, plain.usage.completion_tokens), "streamed": streamed, "chat": chat}


def test_two_ranks_answer_the_openai_client_like_one(servers):
    one, two = answers(servers[1]), answers(servers[2])
    assert one == two
    assert one["plain"][1] == 12 and one["streamed"] and one["chat"]
    cards = {tp: httpx.get(server.url + "/v1/models/tiny").json() for tp, server in servers.items()}
    assert (cards[1]["tensor_parallel_size"], cards[2]["tensor_parallel_size"]) == (1, 2)
    assert cards[2]["kv_cache_tokens"] > 0 and cards[2]["kv_cache_bytes"] > 0
    metrics = httpx.get(servers[2].url + "/metrics").text
    assert 'minerva_tensor_parallel_size{model="tiny"} 2.0' in metrics
    assert f'minerva_kv_cache_tokens{{model="tiny"}} {float(cards[2]["kv_cache_tokens"])}' in metrics


def test_a_killed_rank_ends_streams_with_503_and_the_server_exits_nonzero(servers):
    server = servers[2]
    (worker,) = server.workers()
    events: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": "tiny", "prompt": "once", "max_tokens": 400, "ignore_eos": True, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        except httpx.HTTPError as exc:
            events.append(f"transport error: {exc}")
        first.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert first.wait(60)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=COLLECTIVE_TIMEOUT_S + 30)
    assert not thread.is_alive(), "the stream hung after its rank died"
    errors = [json.loads(e)["error"] for e in events if e.startswith("{") and "error" in json.loads(e)]
    assert errors and errors[0]["code"] == "engine_unavailable" and errors[0]["type"] == "service_unavailable_error"
    try:  # an engine's death drains the server like a SIGTERM (server/serving.py): a request meanwhile is refused
        # by the dead engine, or by the body reader once the drain has begun (when depends on the machine's load)
        refused = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                             timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] in ("engine_unavailable", "server_shutting_down")
    except httpx.TransportError:
        pass  # already gone: the exit below is the check
    code = server.process.wait(timeout=COLLECTIVE_TIMEOUT_S + 30)
    assert code != 0 and time.monotonic() - killed < COLLECTIVE_TIMEOUT_S + 30
    assert "engine stopped" in server.log_path.read_text()
