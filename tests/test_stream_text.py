"""engine/stream_text.py: text made in an API process from a core's token-only outputs reads exactly as the
in-process engine's own (stop strings, holding back, n > 1, min_tokens, logprobs, usage counts), also when the
API process lags and one output covers several steps past a stop."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine
from engine.outputs import RequestAccumulator, RequestOutput, merge_delta
from engine.sampling_params import SamplingParams
from engine.stream_text import RequestText
from tests.engine_testing import assert_idle, make_engine, run_to_completion

PROMPT = "Once upon a time"
# Both engines step the same batches with the same kernels: one torch thread (a count that follows the machine's
# load), an explicit token budget (the CPU latency budget sizes chunks by measured time) and no prefix cache (the
# reference's first request would leave its prompt cached), so their logits, and the tokens drawn, agree.
SAME_STEPS = {"cpu_threads": 1, "max_num_batched_tokens": 2048, "enable_prefix_caching": False}


def split_run(engine: LLMEngine, requests: dict[str, SamplingParams], lag: int) -> dict[str, RequestOutput]:
    """The core's side (no text) and the API process's (RequestText), whose outputs reach it `lag` steps at a
    time, merged (a loaded API process): a stop string found there stops the sample in the engine afterwards."""
    engine.outputs.detokenize = False
    texts = {rid: RequestText(engine.tokenizer, params) for rid, params in requests.items()}
    for rid, params in requests.items():
        engine.add_request(rid, PROMPT, params)
    merged: dict[str, RequestAccumulator] = {}
    pending: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished() or pending:
        if engine.has_unfinished():
            for output in engine.step():
                assert all(sample.text == "" for sample in output.outputs), "the core made text"
                if output.request_id in pending:
                    merge_delta(pending[output.request_id], output)
                else:
                    pending[output.request_id] = output
            steps += 1
        if steps % lag and engine.has_unfinished():
            continue
        for rid, output in pending.items():
            if rid not in texts:
                continue  # finished here: what the core computed before hearing of it goes nowhere
            for index, stop in texts[rid].apply(output):
                engine.finish_sample(rid, index, stop)
            accumulator = merged.setdefault(rid, RequestAccumulator())
            accumulator.add(output)
            if output.finished:
                del texts[rid]
        pending.clear()
    assert not texts, "a request never finished in the API process"
    return {rid: acc.result(rid) for rid, acc in merged.items()}


def samples(output: RequestOutput) -> list[tuple]:
    return [(s.index, s.text, s.token_ids, s.finish_reason, s.stop_reason, s.num_generated,
             None if s.logprobs is None else [(lp.token_id, lp.token, round(lp.logprob, 4)) for lp in s.logprobs])
            for s in output.outputs]


@pytest.mark.parametrize("lag", [1, 3])
def test_text_made_in_the_api_process_matches_the_engines_own(lag):
    reference = make_engine(**SAME_STEPS)
    reference.add_request("free", PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    free = run_to_completion(reference)["free"].outputs[0].text
    assert len(free) > 20
    middle, late = free[8:11], free[-4:]  # stops the greedy sample surely reaches; sampled ones may not
    requests = {
        "greedy": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[middle], logprobs=2),
        "late": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["zzzz", late]),
        "min": SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[free[:3]], min_tokens=6),
        "none": SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["\u00ff\u00fe"]),
        "drawn": SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True,
                                stop=[middle, " "], logprobs=1),
    }
    for rid, params in requests.items():
        reference.add_request(rid, PROMPT, params)
    expected = run_to_completion(reference)
    assert expected["greedy"].outputs[0].stop_reason == middle  # the cases do what they are meant to
    assert expected["none"].outputs[0].finish_reason == "length"

    core = make_engine(**SAME_STEPS)
    got = split_run(core, requests, lag)
    for rid in requests:
        assert samples(got[rid]) == samples(expected[rid]), rid
    assert_idle(core)
