"""Server CPU per streamed token, engine in-process vs `--engine-process`, side by side in one run.

Run: python -m bench.host_ceiling [--concurrency 16] [--max-tokens 64] [--rounds 2]

Each mode starts the real server (`python -m server.cli serve`) on the tiny Llama of the tests with the
torch kernels (a model that costs little, not nothing: the numbers include its forwards), then this
process, as N concurrent streaming clients, sends `--rounds` x N completions. Reported per mode: served
tokens/s and the CPU seconds (user + system, from /proc) each server process spent per streamed token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def start_server(model: Path, engine_process: bool, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "serve", str(model), "--served-model-name", "tiny",
               "--port", str(port), "--device", "cpu", "--dtype", "float32", "--kernel-backend", "torch",
               "--kv-cache-gib", "0.05", "--log-level", "warning"] + (["--engine-process"] if engine_process else [])
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None:
            raise RuntimeError(log_path.read_text())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)


async def stream_load(url: str, concurrency: int, requests: int, max_tokens: int) -> int:
    """Streamed completion tokens over `requests` streams, `concurrency` at a time."""
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.8, "stream_options": {"include_usage": True}}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)

    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one() -> int:
            async with gate, client.stream("POST", url + "/v1/completions", json=body) as response:
                tokens = 0
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
                return tokens

        return sum(await asyncio.gather(*(one() for _ in range(requests))))


def measure(model: Path, engine_process: bool, args: argparse.Namespace, log_dir: Path) -> dict:
    server, url = start_server(model, engine_process, log_dir / f"serve-{engine_process}.log")
    try:
        asyncio.run(stream_load(url, args.concurrency, args.concurrency, 8))  # warm up
        pids = {"api": server.pid, **({"core": children(server.pid)[0]} if engine_process else {})}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        tokens = asyncio.run(stream_load(url, args.concurrency, args.concurrency * args.rounds, args.max_tokens))
        wall = time.perf_counter() - started
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {"mode": "engine process" if engine_process else "in-process", "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "cpu_us_per_token": {name: seconds / tokens * 1e6 for name, seconds in cpu.items()},
            "cpu_us_per_token_total": sum(cpu.values()) / tokens * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.server_fixtures import save_tiny_llama

    with tempfile.TemporaryDirectory(prefix="minerva-host-ceiling-") as directory:
        model = save_tiny_llama(Path(directory) / "tiny-llama")
        results = [measure(model, mode, args, Path(directory)) for mode in (False, True)]
    for result in results:
        per_process = ", ".join(f"{name} {us:.0f}" for name, us in result["cpu_us_per_token"].items())
        print(f"{result['mode']:>15}: {result['tokens_per_s']:7.0f} tok/s, server CPU {result['cpu_us_per_token_total']:.0f} "
              f"us/token ({per_process})")
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
