"""Online-serving benchmark: a load generator for any OpenAI-compatible base URL.

It streams completions (or chat completions) from a prompt dataset at a set request
rate (Poisson arrivals, or all at once) under a cap on concurrent requests, and
reports request and token throughput, TTFT, TPOT, inter-token latency and
end-to-end latency (mean, p50, p90, p99) plus errors. A sweep over concurrency
levels is saved as JSON and plotted as PNG. Definitions follow vLLM's
benchmark_serving: TPOT excludes the first token; ITL is the gap between
successive streamed chunks that carry text.

    python -m bench.serve --base-url http://127.0.0.1:8000/v1 --num-prompts 200 \\
        --concurrency 1 4 16 64 --out bench/results/serve.json

See docs/benchmarks.md for every option.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import httpx
import numpy as np

if TYPE_CHECKING:
    from tqdm import tqdm

DATASETS_DIR = Path(__file__).resolve().parent / "datasets"
PERCENTILES = (50, 90, 99)


class BenchmarkError(ValueError):
    """Bad benchmark input (arguments, dataset file); the message names the problem."""


# --------------------------------------------------------------------------- datasets


@dataclass
class BenchRequest:
    """One prompt to send: text, its expected length in tokens, and max_tokens to ask for."""

    prompt: str
    prompt_len: int
    output_len: int


class TokenCounter:
    """Counts tokens with a tokenizer.json when given, else estimates one token per word.

    The estimate only shapes the workload: the reported token counts come from the
    server's `usage` when it sends one.
    """

    def __init__(self, tokenizer_path: str | Path | None = None) -> None:
        self._tokenizer = None
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer_path)
            if path.is_dir():
                path = path / "tokenizer.json"
            try:
                self._tokenizer = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception
                raise BenchmarkError(f"{path}: cannot read tokenizer: {exc}") from exc

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, num_tokens: int) -> str:
        """A prefix of `text` that re-encodes to at most `num_tokens` tokens (usually exactly)."""
        if self._tokenizer is None:
            return " ".join(text.split()[:num_tokens])
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids[:num_tokens]
        prefix = self._tokenizer.decode(ids)
        while ids and self.count(prefix) > num_tokens:  # decode + encode can merge differently
            ids = ids[:-1]
            prefix = self._tokenizer.decode(ids)
        return prefix


def _lengths(rng: np.random.Generator, num: int, mean: int, dist: str, range_ratio: float) -> list[int]:
    """Sample `num` lengths around `mean`: fixed, uniform within +-range_ratio, or ShareGPT-like."""
    if mean < 1:
        raise BenchmarkError(f"lengths must be >= 1, got {mean}")
    if dist == "fixed":
        return [mean] * num
    if dist == "uniform":
        if not 0.0 <= range_ratio < 1.0:
            raise BenchmarkError(f"--range-ratio must be in [0, 1), got {range_ratio}")
        low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
        uniform: list[int] = rng.integers(low, high + 1, size=num).tolist()
        return uniform
    if dist == "sharegpt":
        # A log-normal with a heavy right tail, like ShareGPT's conversation turns; `mean`
        # sets the median, sigma 1.0 puts the mean near 1.65x the median. Clipped to [4, 8x].
        samples = rng.lognormal(math.log(mean), 1.0, size=num)
        clipped: list[int] = np.clip(np.round(samples), 4, 8 * mean).astype(int).tolist()
        return clipped
    raise BenchmarkError(f"unknown length distribution {dist!r}: use fixed, uniform or sharegpt")


def synthetic_requests(
    num: int,
    input_len: int,
    output_len: int,
    dist: str = "fixed",
    range_ratio: float = 0.0,
    seed: int = 0,
    counter: TokenCounter | None = None,
) -> list[BenchRequest]:
    """Prompts of random English words with the requested token-length distribution."""
    if num < 1:
        raise BenchmarkError(f"--num-prompts must be >= 1, got {num}")
    counter = counter or TokenCounter()
    words = (DATASETS_DIR / "words.txt").read_text().split()
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num, input_len, dist, range_ratio)
    out_lens = _lengths(rng, num, output_len, dist, range_ratio)
    requests = []
    for in_len, out_len in zip(in_lens, out_lens):
        # Words are usually one token or more, so in_len words is at least in_len tokens; truncate.
        text = " ".join(rng.choice(words, size=in_len).tolist())
        text = counter.truncate(text, in_len)
        requests.append(BenchRequest(text, counter.count(text), int(out_len)))
    return requests


def _conversation_pair(record: Any, where: str) -> tuple[str, str] | None:
    """The first human prompt and the reply after it, from ShareGPT or OpenAI-messages shape."""
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        raise BenchmarkError(f"{where}: no 'conversations' (or 'messages') list")
    texts = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BenchmarkError(f"{where}: a turn is not an object")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise BenchmarkError(f"{where}: a turn has no 'value' (or 'content') string")
        texts.append(text)
    if len(texts) < 2 or not texts[0].strip() or not texts[1].strip():
        return None  # a one-sided or empty conversation gives no prompt/reply pair
    return texts[0], texts[1]


def sharegpt_requests(
    path: str | Path,
    num: int,
    seed: int = 0,
    counter: TokenCounter | None = None,
    max_output_len: int | None = None,
) -> list[BenchRequest]:
    """Requests from a ShareGPT-style JSONL (or JSON list) file: first turn as prompt, reply length as output.

    Conversations are shuffled with `seed` and repeated if the file has fewer than `num`.
    """
    path = Path(path)
    counter = counter or TokenCounter()
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchmarkError(f"{path}: cannot read dataset: {exc}") from exc
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
            where = [f"{path}: item {i}" for i in range(len(records))]
        else:
            lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            records = [json.loads(line) for _, line in lines]
            where = [f"{path}:{n}" for n, _ in lines]
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{path}: invalid JSON: {exc}") from exc
    pairs = [p for rec, w in zip(records, where) if (p := _conversation_pair(rec, w)) is not None]
    if not pairs:
        raise BenchmarkError(f"{path}: no conversation with a prompt and a reply")
    random.Random(seed).shuffle(pairs)
    requests = []
    for i in range(num):
        prompt, reply = pairs[i % len(pairs)]
        out_len = max(1, counter.count(reply))
        if max_output_len is not None:
            out_len = min(out_len, max_output_len)
        requests.append(BenchRequest(prompt, counter.count(prompt), out_len))
    return requests


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    """What the client saw of one streamed request; times in seconds."""

    success: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


def _request_body(req: BenchRequest, model: str, endpoint: str, usage: bool, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "stream": True, "temperature": 0.0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def _chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        # Reasoning models (gpt-oss behind vLLM-style servers) stream thoughts as reasoning_content.
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choices[0].get("text") or ""


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    req: BenchRequest,
    endpoint: str = "completions",
    usage: bool = True,
    extra_body: dict[str, Any] | None = None,
) -> RequestResult:
    """Stream one request and time its chunks; any failure becomes an error result, never an exception."""
    body = _request_body(req, model, endpoint, usage, extra_body or {})
    result = RequestResult(success=False, prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    chunks_with_text = 0
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {response.status_code}: {detail}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return result
                now = time.perf_counter()
                text = _chunk_text(chunk, endpoint)
                if text:
                    if chunks_with_text == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks_with_text += 1
                    result.text += text
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    result.prompt_len = int(chunk["usage"].get("prompt_tokens") or result.prompt_len)
    except Exception as exc:  # one request's failure (network, malformed chunk) must not stop the run
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if not done:
        result.error = "stream ended without data: [DONE]"
        return result
    if result.output_tokens == 0:
        result.output_tokens = chunks_with_text  # no usage from the server: one token per chunk
    if chunks_with_text == 0:
        result.ttft = result.latency  # nothing streamed (e.g. immediate EOS): first token = the end
    result.success = True
    return result


# --------------------------------------------------------------------------- load generation


def arrival_gaps(num: int, rate: float, seed: int = 0) -> list[float]:
    """Seconds to wait before each request: exponential gaps of mean 1/rate (Poisson), or 0 for inf."""
    if rate <= 0:
        raise BenchmarkError(f"--request-rate must be positive or inf, got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    gaps[0] = 0.0  # the first request starts the clock
    seconds: list[float] = gaps.tolist()
    return seconds


@dataclass
class RunResult:
    """One benchmark run: its settings, wall duration and every request's result."""

    concurrency: int | None
    request_rate: float
    duration: float
    results: list[RequestResult]


async def run_benchmark(
    base_url: str,
    model: str,
    requests: Sequence[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    endpoint: str = "completions",
    usage: bool = True,
    extra_body: dict[str, Any] | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    seed: int = 0,
    progress: bool = False,
) -> RunResult:
    """Send `requests` at `request_rate` with at most `max_concurrency` in flight; gather results."""
    if endpoint not in ("completions", "chat"):
        raise BenchmarkError(f"endpoint must be completions or chat, got {endpoint!r}")
    if max_concurrency is not None and max_concurrency < 1:
        raise BenchmarkError(f"concurrency must be >= 1, got {max_concurrency}")
    url = base_url.rstrip("/") + ("/chat/completions" if endpoint == "chat" else "/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = max_concurrency or len(requests)
    _raise_open_file_limit(slots + 64)
    limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
    gate = asyncio.Semaphore(slots)
    bar = _progress_bar(len(requests), progress)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                result = await send_request(client, url, model, req, endpoint, usage, extra_body)
            if bar is not None:
                bar.update(1)
            return result

        tasks = []
        start = time.perf_counter()
        for req, gap in zip(requests, arrival_gaps(len(requests), request_rate, seed)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return RunResult(max_concurrency, request_rate, duration, list(results))


def _raise_open_file_limit(needed: int) -> None:
    """Let one process hold a socket per in-flight request (1000 prompts at once need ~1000 fds)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _progress_bar(total: int, enabled: bool) -> tqdm | None:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="req", file=sys.stderr)


# --------------------------------------------------------------------------- metrics


def distribution(values_s: Sequence[float]) -> dict[str, float]:
    """Mean and percentiles in milliseconds (NaN when there are no values)."""
    if len(values_s) == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(run: RunResult) -> dict[str, Any]:
    """Throughput and latency statistics of one run (latencies in ms, throughputs per second)."""
    ok = [r for r in run.results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = run.duration if run.duration > 0 else math.nan
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in run.results if not r.success]
    return {
        "concurrency": run.concurrency,
        "request_rate": None if math.isinf(run.request_rate) else run.request_rate,
        "num_requests": len(run.results),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "duration_s": run.duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution(tpots),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2e_latency_ms": distribution([r.latency for r in ok]),
    }


def format_summary(summary: dict[str, Any], title: str = "Serving benchmark") -> str:
    """A fixed-width text report of one run's summary."""
    conc = summary["concurrency"] or "unlimited"
    rate = summary["request_rate"] or "inf"
    lines = [
        f"==== {title} (concurrency {conc}, rate {rate}) ====",
        f"{'requests ok / errors':<34}{summary['completed']} / {summary['errors']}",
        f"{'duration (s)':<34}{summary['duration_s']:.2f}",
        f"{'input / output tokens':<34}{summary['total_input_tokens']} / {summary['total_output_tokens']}",
        f"{'request throughput (req/s)':<34}{summary['request_throughput']:.2f}",
        f"{'output throughput (tok/s)':<34}{summary['output_throughput']:.1f}",
        f"{'total token throughput (tok/s)':<34}{summary['total_token_throughput']:.1f}",
        f"{'(ms)':<16}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        d = summary[name]
        lines.append(f"{name[:-3].upper():<16}" + "".join(f"{d[k]:>9.1f}" for k in ("mean", "p50", "p90", "p99")))
    lines.extend(f"error: {e}" for e in summary["error_examples"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs


def environment() -> dict[str, Any]:
    """The machine, commit and versions a result was measured with."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "httpx": httpx.__version__,
    }


def plot_sweep(series: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """PNG of output throughput and latency (TTFT p50/p99, TPOT p50) vs concurrency, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, summaries in series.items():
        xs = [s["concurrency"] or s["num_requests"] for s in summaries]
        ax_tput.plot(xs, [s["output_throughput"] for s in summaries], marker="o", label=label)
        ax_lat.plot(xs, [s["ttft_ms"]["p50"] for s in summaries], marker="o", label=f"{label} TTFT p50")
        ax_lat.plot(xs, [s["ttft_ms"]["p99"] for s in summaries], marker="^", ls="--", label=f"{label} TTFT p99")
        ax_lat.plot(xs, [s["tpot_ms"]["p50"] for s in summaries], marker="s", ls=":", label=f"{label} TPOT p50")
    ticks = sorted({s["concurrency"] or s["num_requests"] for summaries in series.values() for s in summaries})
    for ax in (ax_tput, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("max concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_ylim(bottom=0)
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_tput.set_title("throughput")
    ax_lat.set_title("latency")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None, so strict JSON parsers accept it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def run_record(run: RunResult) -> dict[str, Any]:
    """A run's summary plus per-request results (without ITL lists and texts, to stay small)."""
    per_request = [
        {k: v for k, v in asdict(r).items() if k not in ("itl", "text")} for r in run.results
    ]
    return {"summary": summarize(run), "requests": per_request}


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's OpenAI base URL")
    p.add_argument("--model", default=None, help="model id to send (default: the first of GET /models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default="synthetic", help="'synthetic', 'sharegpt-sample' or a ShareGPT JSONL path")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128, help="synthetic: mean (median for sharegpt) prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="synthetic: mean (median for sharegpt) max_tokens")
    p.add_argument("--length-dist", choices=("fixed", "uniform", "sharegpt"), default="fixed")
    p.add_argument("--range-ratio", type=float, default=0.5, help="uniform: lengths within mean*(1 +- r)")
    p.add_argument("--max-output-len", type=int, default=None, help="ShareGPT file: cap on max_tokens")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its dir) to size prompts exactly")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson; inf = all at once")
    p.add_argument("--concurrency", type=int, nargs="+", default=[0], help="max in flight; several = a sweep; 0 = no cap")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and ignored) before each run")
    p.add_argument("--no-usage", action="store_true", help="do not ask for stream_options.include_usage")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request body (e.g. '{\"ignore_eos\": true}')")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (a PNG plot is written beside it for a sweep)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_requests(args: argparse.Namespace, seed: int | None = None, num: int | None = None) -> list[BenchRequest]:
    counter = TokenCounter(args.tokenizer)
    seed = args.seed if seed is None else seed
    num = args.num_prompts if num is None else num
    if args.dataset == "synthetic":
        return synthetic_requests(
            num, args.input_len, args.output_len, args.length_dist, args.range_ratio, seed, counter
        )
    path = DATASETS_DIR / "sharegpt_sample.jsonl" if args.dataset == "sharegpt-sample" else Path(args.dataset)
    return sharegpt_requests(path, num, seed, counter, args.max_output_len)


def requests_per_level(args: argparse.Namespace) -> list[tuple[list[BenchRequest], list[BenchRequest]]]:
    """(warm-up, measured) prompts for each concurrency level, each drawn with its own seed.

    Reusing one prompt set at every level would let a server with prefix caching skip most of
    the prefill from the second level on; synthetic prompts drawn afresh share no prefix (a
    ShareGPT file with fewer conversations than requested still repeats them).
    """
    levels = []
    for level in range(len(args.concurrency)):
        seed = args.seed + 2 * level
        warmup = build_requests(args, seed + 1, args.warmup) if args.warmup else []
        levels.append((warmup, build_requests(args, seed)))
    return levels


async def first_model_id(base_url: str, api_key: str | None = None) -> str:
    """The first id listed by GET {base_url}/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=30.0, headers=headers) as client:
            response = await client.get(base_url.rstrip("/") + "/models")
            response.raise_for_status()
            return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise BenchmarkError(f"cannot list models at {base_url}: {exc}") from exc


async def sweep(args: argparse.Namespace,
                levels: list[tuple[list[BenchRequest], list[BenchRequest]]]) -> list[RunResult]:
    """One run per concurrency level, each after a short warmup, each with its own prompts."""
    model = args.model or await first_model_id(args.base_url, args.api_key)
    args.model = model
    try:
        extra = json.loads(args.extra_body)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"--extra-body is not JSON: {exc}") from exc
    common = dict(
        endpoint=args.endpoint, usage=not args.no_usage, extra_body=extra, api_key=args.api_key, timeout=args.timeout
    )
    runs = []
    for conc, (warmup, requests) in zip(args.concurrency, levels):
        if warmup:
            await run_benchmark(args.base_url, model, warmup, **common)
        run = await run_benchmark(
            args.base_url, model, requests, args.request_rate, conc or None,
            seed=args.seed, progress=not args.no_progress, **common,
        )
        print(format_summary(summarize(run), f"{model} @ {args.base_url}"))
        runs.append(run)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        runs = asyncio.run(sweep(args, requests_per_level(args)))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": {k: v for k, v in vars(args).items() if k != "api_key"},
            "prompts": {"fresh_per_level": True, "seeds": [args.seed + 2 * i for i in range(len(runs))],
                        "prefix_cache_could_hit": args.dataset != "synthetic"},
            "environment": environment(),
            "runs": [run_record(r) for r in runs],
        }
        out.write_text(json.dumps(json_safe(record), indent=1, default=str, allow_nan=False))
        print(f"wrote {out}")
        if len(runs) > 1:
            png = plot_sweep({args.model: [summarize(r) for r in runs]}, out.with_suffix(".png"), args.base_url)
            print(f"wrote {png}")
    return 1 if any(not r.success for run in runs for r in run.results) else 0


if __name__ == "__main__":
    sys.exit(main())
