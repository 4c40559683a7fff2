"""bench/serve.py against a fake OpenAI-shaped server whose timings are known.

The fake streams `max_tokens` chunks: the first after TTFT_S, each next one ITL_S
later, so every metric the benchmark reports has a known expected value.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench import serve

TTFT_S = 0.08
ITL_S = 0.02
TOKENS = 6
E2E_S = TTFT_S + (TOKENS - 1) * ITL_S
SLACK_S = 0.05  # scheduling noise allowed on a shared 2-core machine


class FakeState:
    """What the fake saw: current and peak requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    def reset(self) -> None:
        self.in_flight = self.peak = 0


def fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)
        try:
            n = body["max_tokens"]
            if chat:  # OpenAI's first chat chunk carries only the role: not a token
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n):
                await asyncio.sleep(TTFT_S if i == 0 else ITL_S)
                piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
                yield _sse({"choices": [{"index": 0, "finish_reason": None, **piece}]})
            if body.get("stream_options", {}).get("include_usage"):
                # Report two tokens per chunk so a test can tell usage from chunk counting.
                usage = {"prompt_tokens": 7, "completion_tokens": 2 * n, "total_tokens": 7 + 2 * n}
                yield _sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "FAIL" in prompt:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake():
    state = FakeState()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(fake_app(state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", state
    server.should_exit = True
    thread.join(timeout=10)


def _requests(n: int, prompt: str = "hello there") -> list[serve.BenchRequest]:
    return [serve.BenchRequest(prompt, 2, TOKENS) for _ in range(n)]


def _close(value_ms: float, expected_s: float) -> bool:
    """At least the fake's sleep, at most that plus scheduling slack."""
    return expected_s * 1000 - 3 <= value_ms <= (expected_s + SLACK_S) * 1000


def test_metrics_match_fake_timings(fake):
    url, state = fake
    state.reset()
    run = asyncio.run(serve.run_benchmark(url, "fake-model", _requests(8), max_concurrency=4, usage=False))
    s = serve.summarize(run)
    assert s["completed"] == 8 and s["errors"] == 0
    assert state.peak == 4  # the cap held, and was reached
    assert s["total_output_tokens"] == 8 * TOKENS  # no usage asked: one token per text chunk
    assert _close(s["ttft_ms"]["mean"], TTFT_S) and _close(s["ttft_ms"]["p99"], TTFT_S)
    assert _close(s["tpot_ms"]["mean"], ITL_S)
    assert abs(s["itl_ms"]["p50"] - ITL_S * 1000) < SLACK_S * 1000 / 2
    assert _close(s["e2e_latency_ms"]["p50"], E2E_S) and _close(s["e2e_latency_ms"]["mean"], E2E_S)
    # Two waves of four requests: the duration, and every throughput follows from it.
    assert 2 * E2E_S <= s["duration_s"] <= 2 * E2E_S + 4 * SLACK_S
    assert s["request_throughput"] == pytest.approx(8 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(8 * TOKENS / s["duration_s"])
    assert s["total_token_throughput"] == pytest.approx((8 * TOKENS + 8 * 2) / s["duration_s"])
    assert run.results[0].text == "".join(f" w{i}" for i in range(TOKENS))


def test_usage_counts_win_and_chat_role_chunk_is_not_a_token(fake):
    url, state = fake
    state.reset()
    run = asyncio.run(serve.run_benchmark(url, "fake-model", _requests(3), endpoint="chat", usage=True))
    s = serve.summarize(run)
    assert state.peak == 3  # no cap: all at once
    assert s["total_output_tokens"] == 3 * 2 * TOKENS and s["total_input_tokens"] == 3 * 7
    assert _close(s["ttft_ms"]["p50"], TTFT_S)  # the empty role chunk arrives at once, but is no token
    # TPOT divides the decode time by the usage count, which here is twice the chunks.
    assert s["tpot_ms"]["p50"] == pytest.approx(1000 * (E2E_S - TTFT_S) / (2 * TOKENS - 1), rel=0.3)


def test_errors_are_counted_not_raised(fake):
    url, _ = fake
    reqs = _requests(2) + _requests(1, prompt="please FAIL")
    s = serve.summarize(asyncio.run(serve.run_benchmark(url, "fake-model", reqs, max_concurrency=2)))
    assert s["completed"] == 2 and s["errors"] == 1
    assert s["error_examples"][0].startswith("HTTP 500")
    dead = serve.summarize(asyncio.run(serve.run_benchmark(f"http://127.0.0.1:{_free_port()}/v1", "m", _requests(2))))
    assert dead["completed"] == 0 and dead["errors"] == 2 and "ConnectError" in dead["error_examples"][0]
    assert math.isnan(dead["ttft_ms"]["p99"])


def test_poisson_rate_spaces_arrivals(fake):
    gaps = np.array(serve.arrival_gaps(4000, rate=50.0, seed=1)[1:])
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)  # exponential: CV = 1
    assert serve.arrival_gaps(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(serve.BenchmarkError, match="request-rate"):
        serve.arrival_gaps(3, 0.0)
    url, state = fake
    state.reset()
    expected_span = sum(serve.arrival_gaps(6, rate=20.0, seed=3))
    run = asyncio.run(serve.run_benchmark(url, "fake-model", _requests(6), request_rate=20.0, seed=3))
    assert run.duration >= expected_span + E2E_S - 0.005
    assert state.peak < 6  # spread out, the requests did not all overlap


def test_datasets(tmp_path):
    reqs = serve.synthetic_requests(20, input_len=12, output_len=5, seed=0)
    assert all(r.prompt_len == 12 == len(r.prompt.split()) and r.output_len == 5 for r in reqs)
    uni = serve.synthetic_requests(200, 40, 40, dist="uniform", range_ratio=0.5, seed=0)
    assert {r.prompt_len for r in uni} <= set(range(20, 61)) and len({r.output_len for r in uni}) > 20
    share = serve.synthetic_requests(400, 64, 64, dist="sharegpt", seed=0)
    lens = [r.output_len for r in share]
    assert np.median(lens) == pytest.approx(64, rel=0.2) and np.mean(lens) > 1.3 * np.median(lens)

    sample = serve.sharegpt_requests(serve.DATASETS_DIR / "sharegpt_sample.jsonl", 40, max_output_len=30)
    assert len(sample) == 40 and all(1 <= r.output_len <= 30 for r in sample)
    assert len({r.prompt for r in sample}) == 16  # all the file's conversations, repeated
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi you"}, {"role": "assistant", "content": "a b c"}]}]))
    assert serve.sharegpt_requests(listed, 1)[0] == serve.BenchRequest("hi you", 2, 3)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "x"}]}\n{"nope": 1}\n')
    with pytest.raises(serve.BenchmarkError, match=r"bad.jsonl:2: no 'conversations'"):
        serve.sharegpt_requests(bad, 1)
    bad.write_text("{not json\n")
    with pytest.raises(serve.BenchmarkError, match="invalid JSON"):
        serve.sharegpt_requests(bad, 1)
    with pytest.raises(serve.BenchmarkError, match="unknown length distribution"):
        serve.synthetic_requests(2, 4, 4, dist="zipf")


def test_tokenizer_sizes_synthetic_prompts_exactly(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((serve.DATASETS_DIR / "words.txt").read_text().split(),
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                show_progress=False))  # few merges: words split in pieces
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = serve.TokenCounter(tmp_path)
    reqs = serve.synthetic_requests(10, input_len=17, output_len=3, seed=2, counter=counter)
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt).ids)
        assert 15 <= r.prompt_len <= 17  # re-encoding a cut may merge a token or two differently
        assert len(r.prompt.split()) < 12  # fewer words than tokens: the word estimate would be wrong
    assert sum(r.prompt_len == 17 for r in reqs) >= 7
    with pytest.raises(serve.BenchmarkError, match="cannot read tokenizer"):
        serve.TokenCounter(tmp_path / "missing.json")


def test_cli_sweep_writes_json_and_png(fake, tmp_path, capsys):
    url, _ = fake
    out = tmp_path / "run.json"
    argv = ["--base-url", url, "--num-prompts", "4", "--input-len", "8", "--output-len", str(TOKENS),
            "--concurrency", "1", "4", "--no-progress", "--out", str(out)]
    assert serve.main(argv) == 0
    record = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["settings"]["model"] == "fake-model"  # found through GET /models
    assert record["settings"]["request_rate"] is None  # inf, stored as null
    assert record["environment"]["commit"]
    assert [r["summary"]["concurrency"] for r in record["runs"]] == [1, 4]
    assert record["prompts"] == {"fresh_per_level": True, "seeds": [0, 2], "prefix_cache_could_hit": False}
    serial, parallel = (r["summary"] for r in record["runs"])
    assert parallel["output_throughput"] > 2 * serial["output_throughput"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT" in capsys.readouterr().out
    assert serve.main(["--base-url", url, "--dataset", str(tmp_path / "missing.jsonl")]) == 2


def test_each_concurrency_level_gets_fresh_prompts():
    args = serve._parse_args(["--num-prompts", "5", "--input-len", "16", "--concurrency", "1", "4", "16"])
    levels = serve.requests_per_level(args)
    prompts = [{r.prompt for r in warmup + measured} for warmup, measured in levels]
    assert [len(measured) for _, measured in levels] == [5, 5, 5]
    assert all(not (a & b) for i, a in enumerate(prompts) for b in prompts[i + 1:])  # no prefix to reuse
    again = serve.requests_per_level(args)
    assert [[r.prompt for r in m] for _, m in again] == [[r.prompt for r in m] for _, m in levels]  # seeded
