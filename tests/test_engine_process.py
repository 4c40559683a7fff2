"""The engine core in its own process (`minerva serve --engine-process`): the same outputs as in-process, aborts
cross, a dead core ends streams with an error and the server exits 1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.errors import EngineDeadError
from engine.config import EngineConfig
from engine.outputs import RequestAccumulator
from engine.process_client import ProcessEngineClient
from engine.reports import EngineStats
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.structured import StructuredOutput
from tests.engine_testing import make_engine, reference_greedy, run_to_completion, tiny_llama_dir
from tests.server_fixtures import child_pids, deferred_niceness, niceness

pytestmark = pytest.mark.timeout(240)  # two processes import torch: slow on a loaded machine


def tiny_client() -> ProcessEngineClient:
    return ProcessEngineClient.from_config(EngineConfig(model=str(tiny_llama_dir()), kv_cache_gib=0.01))


async def collect(client: ProcessEngineClient, prompt, params: SamplingParams, request_id: str):
    merged = RequestAccumulator()
    async for output in client.generate(prompt, params, request_id):
        assert output.prompt_token_ids, "the client puts back the prompt ids the core sends once"
        merged.add(output)
    assert merged.finished
    return merged.result(request_id)


async def stats_when(client: ProcessEngineClient, ready, timeout: float = 20.0) -> EngineStats:
    """The client's stats once `ready(stats)` holds (they arrive on the event loop, so this must not block it)."""
    deadline = time.monotonic() + timeout
    while not ready(stats := client.stats()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return stats


def test_outputs_equal_in_process_and_abort_crosses():
    sampled = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=5, logprobs=2, ignore_eos=True)
    in_process = make_engine()
    in_process.add_request("s", "Once upon", sampled)
    expected = run_to_completion(in_process)["s"]

    async def main():
        client = tiny_client()
        await client.start()
        try:
            greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
            first, second, drawn = await asyncio.gather(collect(client, "The quick brown", greedy, "a"),
                                                        collect(client, [1, 5, 9, 2], greedy, "b"),
                                                        collect(client, "Once upon", sampled, "s"))
            for out in (first, second):
                assert out.outputs[0].token_ids == reference_greedy(tuple(out.prompt_token_ids), 6)
            assert [s.token_ids for s in drawn.outputs] == [s.token_ids for s in expected.outputs]
            assert [s.text for s in drawn.outputs] == [s.text for s in expected.outputs]
            assert ([[lp.token_id for lp in s.logprobs] for s in drawn.outputs]
                    == [[lp.token_id for lp in s.logprobs] for s in expected.outputs])

            constrained = await collect(client, "Hi", SamplingParams(max_tokens=8, temperature=0, seed=1,
                                                                     structured=StructuredOutput.json_object()), "j")
            assert constrained.outputs[0].text.lstrip().startswith("{")
            with pytest.raises(InvalidRequestError) as refused:  # refused in the core, raised here with its param
                await collect(client, [1] * 100_000, greedy, "big")
            assert refused.value.param is not None

            before = (await stats_when(client, lambda s: s.num_running == 0)).generation_tokens_total
            async for _ in client.generate("Hello there", SamplingParams(max_tokens=100_000, ignore_eos=True), "gone"):
                break  # the client leaves after its first chunk: the abort crosses to the core
            stats = await stats_when(client, lambda s: s.generation_tokens_total > before
                                     and s.num_running == 0 and s.kv_blocks_used == 0)
            assert stats.num_running == 0 and stats.kv_blocks_used == 0 and stats.num_waiting == 0
        finally:
            await client.shutdown()
        assert client.failure is None

    asyncio.run(main())


def test_core_death_ends_streams_with_an_error():
    async def main():
        client = tiny_client()
        reasons = []
        client.on_fatal = reasons.append
        with pytest.raises(EngineDeadError, match="not running"):  # a 503 from the server, as in-process
            async for _ in client.generate("Hi", SamplingParams(), "early"):
                pass
        await client.start()
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="exited with status"):
            async for _ in client.generate("Hi", SamplingParams(max_tokens=100_000, ignore_eos=True), "long"):
                os.kill(client.core.process.pid, signal.SIGKILL)
        assert time.monotonic() - started < 30
        assert reasons == [client.failure] and "status -9" in client.failure
        with pytest.raises(EngineDeadError):  # later requests are refused at once
            async for _ in client.generate("Hi", SamplingParams(), "later"):
                pass
        await asyncio.wait_for(client.shutdown(), 10)

    asyncio.run(main())


def core_pid(server: subprocess.Popen) -> int:
    """The engine core process the server started (its child running engine.core_process)."""
    found = child_pids(server.pid, b"engine.core_process")
    assert found, "no engine core process"
    return found[0]


def test_serve_engine_process_streams_and_exits_non_zero_when_the_core_dies(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "server.cli", "serve", str(tiny_llama_dir()), "--engine-process",
               "--served-model-name", "tiny", "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--kernel-backend", "torch", "--kv-cache-gib", "0.01", "--shutdown-timeout", "5"]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=log,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert "KV cache" in log_path.read_text()  # the banner, from the core's description
        assert niceness(server.pid) == deferred_niceness(core_pid(server))  # the core outranks it
        body = {"model": "tiny", "prompt": "The quick brown", "max_tokens": 6, "temperature": 0}
        whole = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == whole
        deadline = time.monotonic() + 5  # the core's stats reach /metrics within a few hundred ms
        while "minerva_generation_tokens_total 0.0" in (metrics := httpx.get(url + "/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)

        events = []
        long = {**body, "max_tokens": 100_000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and not events:
                    os.kill(core_pid(server), signal.SIGKILL)
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2])
        assert server.wait(timeout=30) == 1
        assert "engine stopped" in log_path.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
