"""The host ceiling: server CPU per streamed token and the engine's step rate, per serving mode, side by side.

Run: python -m bench.host_ceiling [--concurrency 256] [--max-tokens 64 | --output-lengths 128 512] [--seed 0]
                                  [--rounds 1] [--repeat 1] [--modes in-process engine-process api-servers-2]
                                  [--out FILE.json]

Each mode starts the real server (`python -m server.cli serve`) on the tiny Llama of the tests with the
torch kernels and one torch thread (a model that costs little, not nothing: the numbers include its
forwards), all N requests running at once; a client process of its own (`--client`) then sends
`--rounds` x N streamed completions, N at a time (closed loop: one starts as soon as one ends). Their
output lengths: all `--max-tokens` (every request of a round starts and ends together: waves), or, as
in the issue's own host-ceiling measurement, drawn uniformly from `--output-lengths LO HI` with
`--seed` (request i gets the i-th draw on both sides, so requests start and end at staggered times).

Reported per mode: served tokens/s, the CPU seconds (user + system, from /proc) each server process
spent per streamed token, and the engine's **step rate while serving: engine steps (`steps_total` from
/health) per second of wall time, from the client's first request to its last token**, against the
same engine stepping the same requests with no HTTP load (`--unloaded`, its own process, before the
modes run, the same closed loop of N; its steps per second of stepping): a core starved by HTTP work
steps slower than that. "The same engine" is the mode's own: the in-process engine makes its outputs'
text, an engine core process leaves that to its API processes (engine/stream_text.py), so each repeat
measures the unloaded engine both ways and each mode is held to its own. Each side's generated tokens per step say how full its steps were (a served
engine's requests arrive and leave through HTTP: a step of a few late requests is cheap, and counts
as one step all the same), so the served tokens/s against the unloaded engine's is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx  # the harness's own /health reads; the load uses bare asyncio streams

REPO = Path(__file__).resolve().parents[1]
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
MODES = {
    "in-process": ["--no-engine-process"],
    "engine-process": ["--engine-process"],
    "api-servers-2": ["--engine-process", "--api-server-count", "2"],
}
PROMPT = "The quick brown fox"
EVENT = b"data: {"  # an SSE event with a chunk (the closing `data: [DONE]` is not counted)
# The engine's settings, the same for the served engine and the unloaded one: all N requests run at once, on one
# torch thread (left to itself the unloaded engine would take both cores for its forwards, and the comparison
# would measure intra-op threads instead of what serving takes from the step loop), and an explicit token budget,
# which turns off the CPU latency budget (engine/step_budget.py): the model stands in for a GPU, where no such
# budget runs, and with it a served engine admits arriving prompts a few per step while the unloaded one takes
# all N at once, so the two would step different batches.
ENGINE_SETTINGS: dict[str, Any] = {"device": "cpu", "dtype": "float32", "kernel_backend": "torch",
                                   "kv_cache_gib": 0.05, "cpu_threads": 1, "max_num_batched_tokens": 2048}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (the core, the API processes), depth first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_role(pid: int, server_pid: int) -> str:
    """serve (the process started: the API server, or the launcher of several), core, api (every spawned API
    server process together) or other (multiprocessing's helpers)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    if pid == server_pid:
        return "serve"
    if b"engine.core_process" in cmdline:
        return "core"
    return "api" if b"spawn_main" in cmdline else "other"


def start_server(model: Path, flags: list[str], concurrency: int, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "server.cli", "serve", str(model), "--served-model-name", "tiny",
               "--port", str(port), "--log-level", "warning", "--max-pending", "100000", "--max-num-seqs", str(concurrency),
               *[part for key, value in ENGINE_SETTINGS.items() for part in (f"--{key.replace('_', '-')}", str(value))],
               *flags]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
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


# --- the client process ---------------------------------------------------------------------------------
def output_lengths(args: argparse.Namespace, requests: int) -> list[int]:
    """Each request's max_tokens (ignore_eos: exactly what it generates), in the order the requests start."""
    if args.output_lengths is None:
        return [args.max_tokens] * requests
    low, high = args.output_lengths
    draw = random.Random(args.seed)
    return [draw.randint(low, high) for _ in range(requests)]


async def stream_load(url: str, concurrency: int, lengths: list[int]) -> tuple[int, int, list[float]]:
    """(streamed completion tokens, SSE data events, each stream's seconds to its first event) over one stream
    per length, `concurrency` at a time. A bare asyncio HTTP/1.1 client (one connection per stream, read to its
    close) so that the load takes as little as it can of the cores the server shares with it (its CPU per token
    is reported beside the server's). The events show how finely the tokens came: a server that falls behind
    merges a stream's tokens into fewer. The first event's wait shows how long a new request takes to start,
    which is what a served engine's emptier steps wait on."""
    host, port = url.removeprefix("http://").split(":")
    gate = asyncio.Semaphore(concurrency)  # FIFO: streams start in the lengths' order

    async def one(max_tokens: int) -> tuple[int, int, float]:
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
                           "ignore_eos": True, "temperature": 0.8, "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        events = 0
        first = math.nan
        async with gate:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + body)
            tail = b""
            while chunk := await reader.read(65536):
                events += (tail[-len(EVENT) + 1:] + chunk).count(EVENT)  # the carried bytes cannot hold a whole one
                if events and math.isnan(first):
                    first = time.perf_counter() - started
                tail = (tail + chunk)[-4096:]
            writer.close()
        usage = tail.rpartition(b'"completion_tokens":')[2]
        return (int(usage[:usage.index(b",")]) if usage else 0), events, first

    counts = await asyncio.gather(*(one(max_tokens) for max_tokens in lengths))
    return sum(tokens for tokens, _, _ in counts), sum(events for _, events, _ in counts), [t for _, _, t in counts]


def run_clients(url: str, concurrency: int, lengths: list[int]) -> tuple[int, float, float, int, float, float]:
    """The load, from a process of its own (its CPU is not the server's): (tokens, seconds from the first
    request to the last token, the client's CPU seconds, SSE data events, the median and 90th percentile
    seconds from a stream's start to its first event)."""
    output = subprocess.run([sys.executable, "-m", "bench.host_ceiling", "--client", url, "--concurrency",
                             str(concurrency)], input=json.dumps(lengths), cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    tokens, seconds, cpu, events, first_p50, first_p90 = output.strip().splitlines()[-1].split()
    return int(tokens), float(seconds), float(cpu), int(events), float(first_p50), float(first_p90)


# --- the unloaded engine ----------------------------------------------------------------------------------
def unloaded_rate(model: Path, concurrency: int, lengths: list[int], text: bool) -> dict[str, Any]:
    """The same engine config stepping the same requests, `concurrency` at a time (the next added as soon as one
    ends), with nothing else in its process: steps/s, tokens/s. `text`: it detokenizes (in-process), or not
    (an engine core process's engine)."""
    from engine.builder import build_engine
    from engine.config import EngineConfig
    from engine.core_process import freeze_start_up_heap
    from engine.sampling_params import SamplingParams

    engine = build_engine(EngineConfig(model=str(model), max_num_seqs=concurrency, **ENGINE_SETTINGS))
    engine.outputs.detokenize = text
    freeze_start_up_heap()  # as the core process does once its engine is built
    try:
        for index in range(concurrency):  # warm up
            engine.add_request(f"w{index}", PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        steps_before, tokens_before = engine.steps_total, engine.generation_tokens_total
        started = time.perf_counter()
        queued = iter(enumerate(lengths))
        for index, max_tokens in queued:
            engine.add_request(f"r{index}", PROMPT, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                   temperature=0.8))
            while len(engine.requests) >= concurrency:
                engine.step()
        while engine.has_unfinished():
            engine.step()
        seconds = time.perf_counter() - started
        steps, tokens = engine.steps_total - steps_before, engine.generation_tokens_total - tokens_before
        return {"steps_per_s": steps / seconds, "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps}
    finally:
        engine.close()


def engine_counters(url: str) -> tuple[int, int]:
    """(steps, generated tokens) once the engine is idle. A core process's figures reach /health as of its last
    report (every 0.25 s), so they are read until two reads 0.6 s apart agree (read at once, they missed the
    last steps of a run and the warm-up's)."""
    def read() -> tuple[int, int]:
        stats = httpx.get(url + "/health", timeout=30).json()["models"]["tiny"]
        return stats.get("steps_total", 0), stats["generation_tokens_total"]

    now = read()
    while True:
        time.sleep(0.6)
        before, now = now, read()
        if now == before:
            return now


def measure(model: Path, mode: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    server, url = start_server(model, MODES[mode], args.concurrency, log_dir / f"serve-{mode}.log")
    try:
        run_clients(url, args.concurrency, [8] * args.concurrency)  # warm up
        pids = [server.pid, *descendants(server.pid)]
        before = {pid: cpu_seconds(pid) for pid in pids}
        steps_before, generated_before = engine_counters(url)
        lengths = output_lengths(args, args.concurrency * args.rounds)
        tokens, wall, client_cpu, events, first_p50, first_p90 = run_clients(url, args.concurrency, lengths)
        steps_after, generated_after = engine_counters(url)
        cpu: dict[str, float] = {}
        for pid in pids:
            name = process_role(pid, server.pid)
            cpu[name] = cpu.get(name, 0.0) + cpu_seconds(pid) - before[pid]
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"mode": mode, "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "steps_per_s": (steps_after - steps_before) / wall, "client_cpu_us_per_token": client_cpu / tokens * 1e6,
            "tokens_per_step": (generated_after - generated_before) / max(1, steps_after - steps_before),
            "events_per_stream": events / (args.concurrency * args.rounds),
            "first_event_ms_p50": first_p50 * 1e3, "first_event_ms_p90": first_p90 * 1e3,
            "cpu_us_per_token": {name: seconds / tokens * 1e6 for name, seconds in cpu.items()},
            "cpu_us_per_token_total": sum(cpu.values()) / tokens * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64, help="every request's output length")
    parser.add_argument("--output-lengths", type=int, nargs=2, metavar=("LO", "HI"),
                        help="draw each request's output length uniformly from LO..HI instead (the issue's 128 512)")
    parser.add_argument("--seed", type=int, default=0, help="of the --output-lengths draws")
    parser.add_argument("--rounds", type=int, default=1, help="send rounds x concurrency requests")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of every mode (medians reported)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the load-generating process
    parser.add_argument("--unloaded", type=Path, metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--without-text", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.client:
        started, cpu = time.perf_counter(), time.process_time()
        tokens, events, firsts = asyncio.run(stream_load(args.client, args.concurrency, json.loads(sys.stdin.read())))
        deciles = statistics.quantiles(firsts, n=10)
        print(tokens, time.perf_counter() - started, time.process_time() - cpu, events, deciles[4], deciles[8])
        return
    if args.unloaded:
        print(json.dumps(unloaded_rate(args.unloaded, args.concurrency, json.loads(sys.stdin.read()),
                                       text=not args.without_text)))
        return
    from tests.server_fixtures import save_tiny_llama

    unloaded_runs: dict[str, list[dict[str, Any]]] = {"text": [], "token_ids": []}
    runs = []
    with tempfile.TemporaryDirectory(prefix="minerva-host-ceiling-") as directory:
        model = save_tiny_llama(Path(directory) / "tiny-llama")
        for _ in range(args.repeat):  # modes interleaved, so that a neighbour's load falls on each alike
            for kind, flags in (("text", []), ("token_ids", ["--without-text"])):
                unloaded_runs[kind].append(json.loads(subprocess.run(
                    [sys.executable, "-m", "bench.host_ceiling", "--unloaded", str(model), "--concurrency",
                     str(args.concurrency), *flags],
                    input=json.dumps(output_lengths(args, args.concurrency * args.rounds)),
                    cwd=REPO, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]))
            runs.append([measure(model, mode, args, Path(directory)) for mode in args.modes])
    unloaded_of = {kind: {key: statistics.median(run[key] for run in of_kind) for key in of_kind[0]}
                   for kind, of_kind in unloaded_runs.items()}
    results = []
    for index, mode in enumerate(args.modes):
        of_mode = [run[index] for run in runs]
        summary = {key: statistics.median(result[key] for result in of_mode)
                   for key in ("tokens_per_s", "steps_per_s", "cpu_us_per_token_total", "client_cpu_us_per_token",
                               "events_per_stream", "tokens_per_step", "first_event_ms_p50", "first_event_ms_p90")}
        processes = {name for result in of_mode for name in result["cpu_us_per_token"]}
        summary["cpu_us_per_token"] = {name: statistics.median(result["cpu_us_per_token"].get(name, 0.0)
                                                               for result in of_mode) for name in sorted(processes)}
        unloaded = unloaded_of["text" if mode == "in-process" else "token_ids"]
        summary["steps_vs_unloaded"] = summary["steps_per_s"] / unloaded["steps_per_s"]
        summary["tokens_per_s_vs_unloaded"] = summary["tokens_per_s"] / unloaded["tokens_per_s"]
        results.append({"mode": mode, **summary, "runs": of_mode})
    print(f"medians of {args.repeat} interleaved run(s); load average now {os.getloadavg()[0]:.1f}")
    for kind, unloaded in unloaded_of.items():
        print(f"{'unloaded, ' + kind.replace('_', ' '):>20}: {unloaded['tokens_per_s']:7.0f} tok/s, "
              f"{unloaded['steps_per_s']:6.1f} steps/s of {unloaded['tokens_per_step']:.0f} tokens")
    for result in results:
        per_process = ", ".join(f"{name} {us:.0f}" for name, us in result["cpu_us_per_token"].items() if us)
        print(f"{result['mode']:>20}: {result['tokens_per_s']:7.0f} tok/s, {result['steps_per_s']:6.1f} steps/s "
              f"of {result['tokens_per_step']:.0f} tokens ({result['steps_vs_unloaded']:.0%} of its unloaded engine's "
              f"steps/s, {result['tokens_per_s_vs_unloaded']:.0%} of its tok/s), server CPU "
              f"{result['cpu_us_per_token_total']:.0f} us/token ({per_process}); client "
              f"{result['client_cpu_us_per_token']:.0f}; {result['events_per_stream']:.1f} SSE events per stream; "
              f"first event after {result['first_event_ms_p50']:.0f} ms (p90 {result['first_event_ms_p90']:.0f})")
    load = ({"output_lengths": args.output_lengths, "seed": args.seed} if args.output_lengths is not None
            else {"max_tokens": args.max_tokens})
    report = {"args": {"concurrency": args.concurrency, **load, "rounds": args.rounds, "modes": args.modes,
                       "repeat": args.repeat},
              "load_average": os.getloadavg(), "unloaded": unloaded_of, "unloaded_runs": unloaded_runs,
              "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
