"""Prompt chunks split by layers across steps (engine/scheduler.py `SplitChunk`, DecoderLM.forward_span): beside a
running stream each step runs the stream's whole forward and the chunk's next group of layers. Greedy outputs
equal those of whole chunks, the chunk's tokens count (and sample) only after its last layer, and preemption or
abort mid-chunk drops its state and gives every KV block back."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest

from engine.builder import build_engine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from tests.engine_testing import assert_idle, run_to_completion
from tests.server_fixtures import save_tiny_llama

NUM_LAYERS = 5
LONG_PROMPT = [(7 * i) % 270 + 2 for i in range(150)]
STREAM_PROMPT = [3, 4, 5]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


@functools.lru_cache(maxsize=1)
def five_layer_llama() -> Path:
    return save_tiny_llama(Path(tempfile.mkdtemp(prefix="minerva-split-")) / "llama", max_position_embeddings=512,
                           num_layers=NUM_LAYERS)


def engine_with(split: bool, chunk: int = 24, layers_per_step: int = 2, num_blocks: int | None = None,
                **overrides) -> LLMEngine:
    """The 5-layer Llama; with `split`, the CPU budget's choice fixed to `chunk`-token chunks run `layers_per_step`
    layers a step beside decodes; without, whole `chunk`-token chunks (an explicit token budget)."""
    config = EngineConfig(model=str(five_layer_llama()), max_num_batched_tokens=None if split else chunk,
                          **{"kv_cache_gib": 0.01, "max_model_len": 512, **overrides})
    engine = build_engine(config, num_blocks=num_blocks)
    if split:
        budget = engine.step_budget
        assert budget is not None and budget.num_layers == NUM_LAYERS
        budget.plan = lambda decodes, context, limit: min(chunk, limit)  # type: ignore[method-assign]
        budget.layers_per_step = lambda decodes, context, count: layers_per_step  # type: ignore[method-assign]
    return engine


def record_batches(engine: LLMEngine) -> list[ScheduledBatch]:
    batches: list[ScheduledBatch] = []
    schedule = engine.scheduler.schedule

    def spy() -> ScheduledBatch:
        batches.append(schedule())
        return batches[-1]

    engine.scheduler.schedule = spy  # type: ignore[method-assign]
    return batches


def stream_and_long(engine: LLMEngine, stream_tokens: int, long_tokens: int = 4) -> dict[str, list[int]]:
    """A stream decodes; a long prompt arrives after its first token; both run to the end."""
    engine.add_request("stream", STREAM_PROMPT, SamplingParams(temperature=0.0, max_tokens=stream_tokens,
                                                               ignore_eos=True))
    first = engine.step()
    engine.add_request("long", LONG_PROMPT, SamplingParams(temperature=0.0, max_tokens=long_tokens, ignore_eos=True))
    finals = run_to_completion(engine)
    return {"stream": first[0].outputs[0].token_ids + finals["stream"].outputs[0].token_ids,
            "long": finals["long"].outputs[0].token_ids}


def whole_chunk_outputs(stream_tokens: int) -> dict[str, list[int]]:
    return stream_and_long(engine_with(split=False), stream_tokens)


def test_split_chunks_give_the_whole_chunks_greedy_tokens_and_the_stream_a_token_every_step():
    engine = engine_with(split=True)
    batches = record_batches(engine)
    engine.add_request("stream", STREAM_PROMPT, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    tokens = {"stream": engine.step()[0].outputs[0].token_ids, "long": []}
    engine.add_request("long", LONG_PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    long, stream = engine.requests["long"].samples[0], engine.requests["stream"].samples[0]
    spans, computed = [], []
    while engine.has_unfinished():
        streaming = not stream.finished
        before = len(stream.output_token_ids)
        for output in engine.step():
            tokens[output.request_id] += output.outputs[0].token_ids
        batch = batches[-1]
        spans.append(batch.layer_span)
        computed.append((long.num_computed_tokens, long.num_committed_blocks))
        if streaming and batch.layer_span is not None:
            assert len(stream.output_token_ids) == before + 1  # the stream did not wait for the chunk
            assert batch.items[-1][0] is long
    assert tokens == whole_chunk_outputs(30)
    assert spans[:6] == [(0, 2), (2, 4), (4, 5)] * 2  # each chunk's three groups, one per step
    # Its tokens count and its blocks enter the prefix cache only once its last layer ran.
    previous = (0, 0)
    for span, now in zip(spans, computed):
        if span is not None and span[1] < NUM_LAYERS:
            assert now == previous
        previous = now
    assert computed[:6] == [(0, 0), (0, 0), (24, 1), (24, 1), (24, 1), (48, 3)]
    assert_idle(engine)


def test_when_the_streams_end_a_split_chunk_runs_its_remaining_layers_at_once():
    engine = engine_with(split=True)
    batches = record_batches(engine)
    tokens = stream_and_long(engine, stream_tokens=5)
    assert tokens == whole_chunk_outputs(5)
    spans = [batch.layer_span for batch in batches]
    finished_alone = [batch for batch in batches if batch.layer_span is not None and len(batch.items) == 1]
    assert finished_alone and all(batch.layer_span[1] == NUM_LAYERS and batch.layer_span[0] > 0
                                  for batch in finished_alone)
    assert spans[-1] is None  # then whole chunks: no stream waits
    assert_idle(engine)


@pytest.mark.parametrize("layers_per_step", [1, 3])
def test_preemption_mid_chunk_starts_the_chunk_over_and_gives_every_block_back(layers_per_step):
    """A pool too small for both: the stream's growth preempts the long prompt with a chunk part-way through its
    layers; the chunk starts again from its first layer when the prompt returns."""
    small_pool = {"num_blocks": 11, "max_model_len": 176, "enable_prefix_caching": False}
    engine = engine_with(split=True, layers_per_step=layers_per_step, **small_pool)
    batches = record_batches(engine)
    preempted_mid_chunk = []
    preempt = engine.scheduler._preempt

    def spy(seq):  # type: ignore[no-untyped-def]
        split = engine.scheduler.split
        preempted_mid_chunk.append(split is not None and split.seq is seq and split.layers_done > 0)
        preempt(seq)

    engine.scheduler._preempt = spy  # type: ignore[method-assign]
    tokens = stream_and_long(engine, stream_tokens=60)
    assert any(preempted_mid_chunk)
    reference = stream_and_long(engine_with(split=False, **small_pool), 60)
    assert tokens == reference
    restarted = [b.layer_span for b in batches if b.layer_span is not None]
    assert restarted.count((0, layers_per_step)) > -(-len(LONG_PROMPT) // 24)  # more chunk starts than chunks
    assert_idle(engine)


def test_abort_mid_chunk_drops_its_state_and_the_prompt_later_runs_the_same():
    engine = engine_with(split=True)
    engine.add_request("stream", STREAM_PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.step()
    engine.add_request("long", LONG_PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.scheduler.split is None or engine.scheduler.split.layers_done == 0:
        engine.step()
    long = engine.scheduler.split.seq
    runner = engine.executor.runner
    assert runner.seqs[long.seq_id].chunk_state is not None
    engine.abort("long")
    assert engine.scheduler.split is None
    engine.step()
    assert long.seq_id not in runner.seqs
    engine.add_request("long", LONG_PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    finals = run_to_completion(engine)
    assert finals["long"].outputs[0].token_ids == whole_chunk_outputs(30)["long"]
    assert_idle(engine)


def test_speculative_decoding_beside_a_split_chunk_keeps_greedy_tokens():
    engine = engine_with(split=True, speculative_config=NGRAM)
    batches = record_batches(engine)
    tokens = stream_and_long(engine, stream_tokens=40)
    assert any(batch.layer_span is not None for batch in batches)
    assert tokens == stream_and_long(engine_with(split=False, speculative_config=NGRAM), 40)
    assert_idle(engine)
