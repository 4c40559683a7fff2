"""Async scheduling (launch step N+1 before reading step N's tokens) changes when outputs arrive, never what they are.

Both engines run the same requests on the tiny Llama with its real tokenizer; seeded sampling
is batch-invariant, so every request (greedy, seeded, n=2, stop strings, stop ids, min_tokens,
penalties, logprobs, a JSON grammar) must come out identical, token for token and character for
character, with chunked prefill, prefix caching and preemption, and every KV block back in the pool.
"""

from __future__ import annotations

import json

import pytest

from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutput
from tests.engine_testing import assert_idle, make_engine, run_to_completion

PROMPTS = ["The quick brown fox", "Hello there", "Paged attention keeps the key value cache in blocks.",
           "Hello there, general", "A", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12"]


def _requests(tokenizer) -> list[tuple[str, SamplingParams]]:
    some_token = tokenizer.encode("the", add_special_tokens=False)[0]
    params = [
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=10, stop=["e", "th"]),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[some_token]),
        SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=7,
                       logprobs=2, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=14,
                       structured=StructuredOutput.from_schema({"type": "object", "properties": {
                           "a": {"type": "integer"}}, "required": ["a"]})),
    ]
    return list(zip(PROMPTS, params))


def _run(async_scheduling: bool, **config) -> dict:
    engine = make_engine(async_scheduling=async_scheduling, **config)
    for i, (prompt, params) in enumerate(_requests(engine.tokenizer)):
        engine.add_request(str(i), prompt, params)
    results = run_to_completion(engine)
    assert_idle(engine)
    return {rid: [(o.text, o.token_ids, o.finish_reason, o.stop_reason,
                   [(lp.token_id, round(lp.logprob, 4)) for lp in o.logprobs or []]) for o in out.outputs]
            for rid, out in results.items()}


@pytest.mark.parametrize("config", [
    dict(),
    dict(max_num_batched_tokens=8),  # chunked prefill
    dict(num_blocks=14, block_size=4, enable_prefix_caching=False, max_num_seqs=8),  # preemption
    dict(num_blocks=40, block_size=4, max_num_seqs=3),  # prefix caching, a waiting queue
], ids=["plain", "chunked", "preempting", "queued"])
def test_async_scheduling_gives_the_same_outputs(config):
    sync, overlapped = _run(False, **config), _run(True, **config)
    assert overlapped == sync
    assert len(sync) == len(PROMPTS)
    json.loads(sync["5"][0][0])  # the grammar request finished a valid object (it opted out of look-ahead)


def test_async_engine_drops_tokens_past_a_finish():
    """A request that ends on step N had step N+1 computed for it: those tokens never show, its blocks come back."""
    engine = make_engine(async_scheduling=True)
    engine.add_request("short", "Hello", SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    engine.add_request("long", "Hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    results = run_to_completion(engine)
    assert len(results["short"].outputs[0].token_ids) == 1
    assert len(results["long"].outputs[0].token_ids) == 6
    assert engine.generation_tokens_total == 7
    assert_idle(engine)
