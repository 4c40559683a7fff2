"""Step messages (engine/step_messages.py): any SchedulerOutput and RunnerOutput survives msgpack unchanged, and
runner and engine need nothing but the messages: random traffic whose every step and answer cross a msgpack
round trip (preemption, aborts, prefix caching, chunked prefill, speculative rollback, async scheduling) gives
the same tokens as the fake model's own continuation."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.builder import engine_for_model
from engine.config import EngineConfig
from engine.outputs import RequestAccumulator
from engine.sampling_params import SamplingParams
from engine.step_messages import (CachedSequences, NewSequence, PromptRowSpan, PromptScores, RunnerOutput,
                                  SchedulerOutput)
from engine.structured.spec import StructuredOutput
from tests.engine_testing import assert_idle
from tests.fake_model import FakeModel, IdTokenizer, next_token

ids = st.lists(st.integers(0, 2**31 - 1), max_size=6)
params = st.builds(SamplingParams, n=st.integers(1, 3), max_tokens=st.none() | st.integers(1, 99),
                   temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), top_k=st.integers(-1, 50),
                   seed=st.none() | st.integers(0, 2**63), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2),
                   stop_token_ids=ids, logprobs=st.none() | st.integers(0, 20),
                   logit_bias=st.none() | st.dictionaries(st.integers(0, 999), st.floats(-100, 100), max_size=3),
                   structured=st.none() | st.just(StructuredOutput.from_schema({"type": "object"})),
                   prompt_logprobs=st.none() | st.integers(0, 5))
new_seqs = st.lists(st.builds(NewSequence, st.integers(0, 2**40), ids, st.integers(0, 6), ids, st.integers(0, 10**6),
                              params, st.none() | st.integers(0, 2**64 - 1), ids), max_size=3)


@st.composite
def cached_seqs(draw) -> CachedSequences:
    n = draw(st.integers(0, 5))
    column = lambda values: draw(st.lists(values, min_size=n, max_size=n))  # noqa: E731
    return CachedSequences(column(st.integers(0, 2**40)), column(st.integers(0, 64)), column(ids),
                           column(st.integers(0, 10**6)))


steps = st.builds(SchedulerOutput, new_seqs, cached_seqs(), ids, ids, ids,
                  st.dictionaries(st.integers(0, 2**40), ids, max_size=3),
                  st.lists(st.builds(PromptRowSpan, st.integers(0, 9), st.integers(0, 9), st.integers(1, 9)),
                           max_size=2), ids, ids, st.dictionaries(st.integers(0, 2**40), st.integers(0, 99), max_size=3),
                  st.none() | st.binary(max_size=64))
logprob = st.floats(-100, 0)
top = st.lists(st.tuples(st.integers(0, 2**31 - 1), logprob), max_size=3)
answers = st.builds(RunnerOutput, ids, ids, st.lists(st.none() | logprob, max_size=4),
                    st.lists(st.none() | top, max_size=4),
                    st.lists(st.builds(PromptScores, st.lists(logprob, max_size=3), ids, st.lists(top, max_size=3)),
                             max_size=2))


@settings(max_examples=200, deadline=None)
@given(steps, answers)
def test_any_step_message_and_answer_round_trip(step, answer):
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(step), type=SchedulerOutput) == step
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(answer), type=RunnerOutput) == answer


def round_trip(message, kind):
    return msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=kind)


class Serialized:
    """The runner's answer as the engine would receive it from another process."""

    def __init__(self, result) -> None:
        self.result = result

    def prompt_logprobs(self) -> list[PromptScores]:
        return round_trip(self.result.prompt_logprobs(), list[PromptScores])

    def output(self) -> RunnerOutput:
        return round_trip(self.result.output(), RunnerOutput)


def expected(prompt: list[int], max_tokens: int, vocab: int) -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(next_token(context, vocab))
    return context[len(prompt):]


requests = st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=24), st.integers(1, 8),
                              st.integers(0, 8), st.booleans()), min_size=1, max_size=8)
modes = st.sampled_from([{}, {"async_scheduling": True},
                         {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                 "prompt_lookup_min": 1}}])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(10, 24), st.sampled_from([2, 4]), st.integers(1, 4), st.integers(4, 40), st.booleans(),
       modes)
def test_the_runner_steps_from_serialized_messages_alone(reqs, num_blocks, block_size, max_seqs, budget, prefix, mode):
    config = EngineConfig(block_size=block_size, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_prefix_caching=prefix, **mode)
    max_len = min(num_blocks * block_size, 32)
    engine = engine_for_model(FakeModel(), IdTokenizer(), config, max_model_len=max_len, num_blocks=num_blocks)
    execute = engine.executor.execute
    engine.executor.execute = lambda step: Serialized(execute(round_trip(step, SchedulerOutput)))
    pending = [(i, r) for i, r in enumerate(reqs) if len(r[0]) < max_len]
    merged, finals, aborted, step = {}, {}, set(), 0
    while pending or engine.has_unfinished():
        for i, (prompt, max_tokens, arrive, abort) in list(pending):
            if arrive <= step:
                pending.remove((i, (prompt, max_tokens, arrive, abort)))
                engine.add_request(str(i), prompt, SamplingParams(
                    temperature=0, max_tokens=min(max_tokens, max_len - len(prompt)), ignore_eos=True))
        for out in engine.step():
            merged.setdefault(out.request_id, RequestAccumulator()).add(out)
            if out.finished:
                finals[out.request_id] = merged[out.request_id].result(out.request_id)
        step += 1
        for i, (_, _, arrive, abort) in enumerate(reqs):
            if abort and arrive + 2 == step and str(i) in engine.requests:
                finals[str(i)] = engine.abort(str(i))
                aborted.add(str(i))
    assert_idle(engine)
    for i, (prompt, max_tokens, _, _) in pending or [(i, r) for i, r in enumerate(reqs) if len(r[0]) < max_len]:
        tokens = finals[str(i)].outputs[0].token_ids
        want = expected(prompt, min(max_tokens, max_len - len(prompt)), FakeModel().vocab_size)
        assert tokens == (want[:len(tokens)] if str(i) in aborted else want)
    engine.add_request("last", [1], SamplingParams(temperature=0, max_tokens=1))
    last = engine.requests["last"].samples[0].seq_id
    while engine.has_unfinished():
        engine.step()
    assert engine.executor.runner.seqs.keys() <= {last}  # every earlier sequence was freed by a later message
