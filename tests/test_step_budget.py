"""The latency-aware step budget on CPU: beside running streams a long prompt advances in chunks the
start-up measurement sized, so each stream still gets its token every step; an explicit
--max-num-batched-tokens (or no running stream) leaves the whole budget to the prompt."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.builder import engine_for_model
from engine.request import Sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_budget import MIN_PREFILL_TOKENS, STALL_RATIO
from tests.engine_testing import make_engine, run_to_completion
from tests.fake_model import FakeModel, IdTokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def sample(request_id: str, prompt_len: int, max_tokens: int = 8) -> Sample:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Sample(request_id, 0, [1] * prompt_len, params, max_tokens, None, stop_token_ids=frozenset())


def test_budget_beside_decodes_caps_the_prompt_chunk():
    scheduler = Scheduler(BlockPool(200, 4, False), max_num_seqs=8, max_num_batched_tokens=512)
    scheduler.prefill_beside_decodes = 24
    stream = sample("stream", 3)
    scheduler.add(stream)
    first = scheduler.schedule()
    assert first.items == [(stream, 3)]  # nothing decodes yet: the whole budget is the prompt's
    scheduler.after_step(first)
    stream.output_token_ids.append(5)
    long = sample("long", 400)
    scheduler.add(long)
    assert scheduler.step_budget(decodes=1) == 1 + 24  # the stream decodes beside the long prompt
    batch = scheduler.schedule()
    assert batch.items == [(stream, 1), (long, 24)]
    scheduler.after_step(batch)
    scheduler.prefill_beside_decodes = None
    assert scheduler.step_budget(decodes=1) == 512


def test_engine_measures_the_budget_on_cpu_and_a_given_budget_overrides():
    engine = make_engine()
    budget = engine.step_budget
    assert budget is not None and budget.decode_ms > 0 and budget.token_ms > 0
    expected = max(MIN_PREFILL_TOKENS, int((STALL_RATIO - 1) * budget.decode_ms / budget.token_ms))
    assert budget.prefill_tokens == min(expected, engine.config.batched_tokens)
    assert engine.scheduler.prefill_beside_decodes == budget.prefill_tokens
    assert engine.stats().step_prefill_budget == budget.prefill_tokens
    given = make_engine(max_num_batched_tokens=64)
    assert given.step_budget is None and given.scheduler.prefill_beside_decodes is None
    assert engine_for_model(FakeModel(), IdTokenizer(), EngineConfig(), max_model_len=64, num_blocks=8).step_budget is None


def test_a_stream_gets_a_token_every_step_while_a_long_prompt_prefills():
    """The head-of-line case on the tiny Llama: the short stream decodes at every step of the long
    prompt's prefill, whose chunks stay within the budget, and both get the tokens they would alone."""
    engine = make_engine(max_model_len=512)
    assert engine.step_budget is not None
    engine.scheduler.prefill_beside_decodes = 32  # fixed so the chunk count does not depend on the machine
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
