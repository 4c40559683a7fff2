"""LLMEngine end to end on a tiny random Llama against transformers' greedy decoding."""

from __future__ import annotations

import pytest

from engine.sampling_params import InvalidRequestError, SamplingParams
from tests.engine_testing import assert_idle, make_engine, reference_greedy, run_to_completion

PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps the key value cache in fixed size blocks.",
    "Hello",
    "Minerva serves language models over an OpenAI compatible API. Streaming tokens arrive",
    "The quick brown fox jumps",  # shares a prefix with the first
]
MAX_TOKENS = 10


def _greedy_all(engine, prompts=PROMPTS):
    ids = {}
    for i, prompt in enumerate(prompts):
        ids[f"r{i}"] = engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                           ignore_eos=True))
    finals = run_to_completion(engine)
    assert sorted(finals) == sorted(ids)
    return {rid: (ids[rid], finals[rid].outputs[0].token_ids) for rid in ids}


@pytest.mark.parametrize("chunked,prefix,num_blocks,budget", [
    (True, True, None, 2048),
    (True, False, None, 16),   # small token budget: prompts split into chunks
    (False, True, None, 2048),
    (False, False, None, 2048),
    (True, True, 8, 32),       # tiny pool: forced preemption
    (True, False, 7, 2048),
])
def test_batched_greedy_equals_transformers(chunked, prefix, num_blocks, budget):
    engine = make_engine(num_blocks=num_blocks, block_size=4 if num_blocks else 16, enable_chunked_prefill=chunked,
                         enable_prefix_caching=prefix, max_num_batched_tokens=budget, max_model_len=28 if num_blocks else None)
    results = _greedy_all(engine)
    for prompt_ids, tokens in results.values():
        assert tokens == reference_greedy(tuple(prompt_ids), MAX_TOKENS)
    if num_blocks:
        assert engine.stats().num_preemptions > 0
    assert_idle(engine)


def test_prefix_cache_hits_and_same_tokens():
    engine = make_engine(block_size=4)
    first = _greedy_all(engine, PROMPTS[:1])
    again = _greedy_all(engine, PROMPTS[:1])
    assert first["r0"] == again["r0"]
    assert engine.stats().prefix_cache_hit_rate > 0


def test_seeded_sampling_independent_of_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=7, n=2, ignore_eos=True)
    alone = make_engine()
    alone.add_request("x", PROMPTS[1], params)
    solo = run_to_completion(alone)["x"]
    crowded = make_engine()
    for i, prompt in enumerate(PROMPTS):
        crowded.add_request(f"o{i}", prompt, SamplingParams(temperature=1.0, max_tokens=8))
    crowded.add_request("x", PROMPTS[1], params)
    mixed = run_to_completion(crowded)["x"]
    assert [o.token_ids for o in solo.outputs] == [o.token_ids for o in mixed.outputs]
    assert solo.outputs[0].token_ids != solo.outputs[1].token_ids  # samples differ from each other
    assert_idle(crowded)


def test_stop_string_min_tokens_and_deltas():
    engine = make_engine()
    ids = engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    full = engine.tokenizer.decode(reference_greedy(tuple(ids), MAX_TOKENS))
    stop = full[3:6]
    deltas, new_ids = [], []
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0].text)
            new_ids.append(out.outputs[0].token_ids)
            assert out.outputs[0].num_generated == sum(map(len, new_ids))
    engine.add_request("b", PROMPTS[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop]))
    stopped = run_to_completion(engine)["b"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == full[:full.find(stop)]
    assert "".join(deltas) == full
    assert all(len(ids) == 1 for ids in new_ids)  # one new token per step, not the whole list again
    assert_idle(engine)


def test_abort_frees_blocks_and_bad_requests_rejected():
    engine = make_engine(max_model_len=64)
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=20))
    engine.step()
    assert engine.pool.num_used > 0
    out = engine.abort("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert_idle(engine)
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("b", list(range(5)) * 13, SamplingParams())
    assert err.value.param == "prompt" and err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError, match="out of range") as err:
        engine.add_request("v", [1, engine.model.vocab_size], SamplingParams())
    assert err.value.param == "prompt"
    # max_tokens beyond what the context has left is clamped (the server's rule too): ends with "length"
    engine.add_request("c", [1, 2, 3], SamplingParams(max_tokens=62, ignore_eos=True))
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            finals.setdefault(out.request_id, []).append(out)
    generated = sum(len(o.outputs[0].token_ids) for o in finals["c"])
    assert generated == 64 - 3 and finals["c"][-1].outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_model_error_fails_only_that_step():
    engine = make_engine()
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=4))
    forward = engine.model.forward
    engine.model.forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    outs = engine.step()
    assert outs[0].outputs[0].finish_reason == "abort" and "boom" in outs[0].outputs[0].stop_reason
    engine.model.forward = forward
    assert_idle(engine)
    engine.add_request("b", PROMPTS[0], SamplingParams(max_tokens=4))
    assert run_to_completion(engine)["b"].outputs[0].finish_reason == "length"


def test_n_samples_share_prompt_blocks():
    engine = make_engine(block_size=4)
    prompt = PROMPTS[3]
    engine.add_request("n", prompt, SamplingParams(temperature=1.0, n=3, max_tokens=4, seed=1))
    prompt_len = len(engine.requests["n"].prompt_token_ids)
    out = run_to_completion(engine)["n"]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 4 for o in out.outputs)
    assert engine.pool.prefix_hits == 2 * ((prompt_len - 1) // 4)  # samples 1 and 2 reuse every full prompt block
    assert_idle(engine)


def test_penalties_and_logprobs_through_the_engine():
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.5, frequency_penalty=1.0,
                            logprobs=2, ignore_eos=True)
    engine.add_request("p", PROMPTS[0], params)
    out = run_to_completion(engine)["p"].outputs[0]
    assert len(out.logprobs) == 6 and all(len(lp.top) == 2 for lp in out.logprobs)
    assert all(lp.token_id == lp.top[0][0] and lp.logprob <= 0 for lp in out.logprobs)  # greedy = best
    assert out.token_ids != reference_greedy(tuple(engine.tokenizer.encode(PROMPTS[0])), 6) or len(set(out.token_ids)) == 6
    assert_idle(engine)


def test_offline_llm_generate_keeps_prompt_order():
    from engine.llm import LLM
    from tests.engine_testing import tiny_llama_dir

    llm = LLM(str(tiny_llama_dir()), kv_cache_gib=0.01)
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [o.prompt_token_ids for o in outs] == [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    for out in outs:
        assert out.outputs[0].token_ids == reference_greedy(tuple(out.prompt_token_ids), 4)
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))[0].finished
    assert_idle(llm.engine)


def test_pool_too_small_for_one_sequence_is_a_config_error():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="max_model_len"):
        make_engine(num_blocks=2, block_size=4, max_model_len=64)
