"""Speculative decoding changes how many tokens a step yields, never which ones (or their distribution).

The tiny Llama with its real tokenizer runs the async-scheduling feature matrix with and without
speculation: greedy rows must come out identical (and equal to transformers' own greedy decode),
seeded sampling, penalised and grammar rows identical too, every block back (tests/test_spec_decode_rules.py
has the rows with per-token rules where drafts land often).
A fake paged model, whose logits are read back through the KV cache, checks rollback under random
accept/reject patterns, preemption and aborts; a 3-token vocabulary checks the sampled distribution,
plain and penalised.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import build_engine, engine_for_model
from engine.outputs import RequestAccumulator
from engine.sampling_params import SamplingParams
from engine.spec_decode.step_cost import StepCost
from engine.structured.spec import StructuredOutput
from tests.engine_testing import assert_idle, make_engine, reference_greedy, run_to_completion
from tests.fake_model import FakeModel, IdTokenizer

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
SUFFIX = {"method": "suffix", "num_speculative_tokens": 4}

PROMPTS = ["The quick brown fox", "Hello there", "Paged attention keeps the key value cache in blocks.",
           "Hello there, general", "A", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12", "one two one two one two",
           "abc abc abc abc"]


def _requests(tokenizer) -> list[tuple[str, SamplingParams]]:
    some_token = tokenizer.encode("the", add_special_tokens=False)[0]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=16, stop=["e", "th"], n=2),
        SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[some_token]),
        SamplingParams(temperature=0.9, seed=3, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=7,
                       logprobs=2, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=5, max_tokens=14,
                       structured=StructuredOutput.from_schema({"type": "object", "properties": {
                           "a": {"type": "integer"}}, "required": ["a"]})),
        SamplingParams(temperature=0, max_tokens=25, min_tokens=20),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, presence_penalty=0.5),
    ]
    return list(zip(PROMPTS, params))


def _run(spec: dict | None, **config) -> tuple[dict, LLMEngine]:
    engine = make_engine(speculative_config=spec, **config)
    if engine.spec is not None:  # verify every draft: these tests are about exactness, not the cost model's choice
        engine.spec.step_cost = None
    for i, (prompt, params) in enumerate(_requests(engine.tokenizer)):
        engine.add_request(str(i), prompt, params)
    results = run_to_completion(engine)
    assert_idle(engine)
    return {rid: [(o.text, o.token_ids, o.finish_reason, o.stop_reason,
                   [(lp.token_id, lp.logprob) for lp in o.logprobs or []]) for o in out.outputs]
            for rid, out in results.items()}, engine


def without_logprob_values(outputs: dict) -> dict:
    return {rid: [(*row[:4], [token for token, _ in row[4]]) for row in rows] for rid, rows in outputs.items()}


def logprob_values(outputs: dict) -> list[float]:
    return [value for rid in sorted(outputs) for row in outputs[rid] for _, value in row[4]]


@pytest.mark.parametrize("spec", [NGRAM, SUFFIX], ids=["ngram", "suffix"])
@pytest.mark.parametrize("config", [
    dict(),
    dict(max_num_batched_tokens=8),  # chunked prefill, drafts squeezed by the budget
    dict(num_blocks=16, block_size=4, enable_prefix_caching=False, max_num_seqs=8),  # preemption
    dict(num_blocks=40, block_size=4, max_num_seqs=3),  # prefix caching, a waiting queue
], ids=["plain", "chunked", "preempting", "queued"])
def test_speculation_gives_the_same_outputs(spec, config):
    plain, _ = _run(None, **config)
    speculative, engine = _run(spec, **config)
    assert without_logprob_values(speculative) == without_logprob_values(plain)
    assert logprob_values(speculative) == pytest.approx(logprob_values(plain), abs=1e-3)  # k+1-row vs 1-row matmuls
    stats = engine.spec.stats
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens


def test_greedy_speculation_matches_transformers():
    engine = make_engine(speculative_config=NGRAM)
    prompt = engine.tokenizer.encode("one two one two one two")
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    result = run_to_completion(engine)["r"]
    assert result.outputs[0].token_ids == reference_greedy(tuple(prompt), 24)
    assert engine.spec.stats.num_accepted_tokens > 0
    assert_idle(engine)


def test_async_scheduling_is_refused_with_speculation():
    with pytest.raises(ConfigError, match="synchronous scheduling"):
        EngineConfig(speculative_config=NGRAM, async_scheduling=True)
    assert EngineConfig(speculative_config='{"method": "suffix"}').speculative_config.method == "suffix"


def wobbly(context: list[int], vocab: int) -> int:
    """Mostly a function of the last two tokens (n-gram drafts often right), sometimes of the position."""
    return (context[-1] + (context[-2] if len(context) > 1 else 0) + (len(context) % 7 == 0)) % vocab


def fibonacci(context: list[int], vocab: int) -> int:
    """A function of the last two tokens alone: periodic (20 tokens modulo 5), so n-gram drafts land once it repeats."""
    return (context[-1] + (context[-2] if len(context) > 1 else 0)) % vocab


def expected(prompt: list[int], max_tokens: int, vocab: int, rule=wobbly) -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(rule(context, vocab))
    return context[len(prompt):]


traffic = st.lists(st.tuples(st.lists(st.integers(0, 4), min_size=1, max_size=20), st.integers(1, 16),
                             st.integers(0, 6), st.booleans()), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic, st.integers(8, 24), st.sampled_from([2, 4]), st.integers(1, 5), st.integers(4, 40), st.booleans(),
       st.sampled_from([NGRAM, SUFFIX]))
def test_rollback_under_random_traffic(reqs, num_blocks, block_size, max_seqs, budget, prefix, spec):
    """Every accept/reject pattern the traffic makes: the fake model reads its context back through the block
    tables, so a draft's KV left behind, a stale block-table row or a wrong computed count changes the tokens."""
    config = EngineConfig(block_size=block_size, max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                          enable_prefix_caching=prefix, speculative_config=spec)
    max_len = min(num_blocks * block_size, 36)
    engine = engine_for_model(FakeModel(5, wobbly), IdTokenizer(), config, max_model_len=max_len, num_blocks=num_blocks)
    pending = [(i, r) for i, r in enumerate(reqs) if len(r[0]) < max_len]
    merged, finals, step = {}, {}, 0
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
        for i, (prompt, _, arrive, abort) in enumerate(reqs):
            if abort and arrive + 3 == step and str(i) in engine.requests:
                finals[str(i)] = engine.abort(str(i))
                reqs[i] = (prompt, 0, arrive, abort)
        assert len({b for s in engine.scheduler.running for b in s.block_ids}) <= engine.pool.num_used
        assert step < 2000
    for i, (prompt, max_tokens, arrive, abort) in enumerate(reqs):
        if str(i) in finals and max_tokens:
            want = expected(prompt, min(max_tokens, max_len - len(prompt)), 5)
            assert merged[str(i)].result(str(i)).outputs[0].token_ids == want
    assert_idle(engine)


@pytest.mark.parametrize("penalties", [{}, dict(repetition_penalty=1.3, presence_penalty=0.3, frequency_penalty=0.7)],
                         ids=["plain", "penalised"])
def test_sampled_distribution_is_the_targets(penalties):
    """Chi-square over all 27 three-token outputs of a 3-token vocabulary at temperature 1, against the exact
    probabilities of the fake model's logits (one-hot 1.0: the predicted token e/(e+2), the others 1/(e+2)), or
    of those logits penalised by OpenAI's rules (every token is in the prompt, so the repetition penalty divides
    the predicted one; presence and frequency count the output so far: a verified position's count must include
    the drafts before it). The prompt repeats, so the n-gram proposer drafts at every decode step and both
    rejection and acceptance happen. df = 26: the statistic exceeds 54.1 with probability 0.001 if the
    distribution is right."""
    vocab, prompt, num_requests = 3, [0, 1, 2, 0, 1, 2, 0, 1], 1500

    def predict(context: list[int], vocab_size: int) -> int:
        return (context[-1] + 1) % vocab_size if context[-2] != context[-1] else 0

    def probabilities(context: list[int]) -> list[float]:
        output = context[len(prompt):]
        logits = [(1.0 / penalties.get("repetition_penalty", 1.0) if token == predict(context, vocab) else 0.0)
                  - penalties.get("frequency_penalty", 0.0) * output.count(token)
                  - penalties.get("presence_penalty", 0.0) * (token in output) for token in range(vocab)]
        weights = [math.exp(logit) for logit in logits]
        return [weight / sum(weights) for weight in weights]

    spec = {**NGRAM, "num_speculative_tokens": 2, "disable_by_batch_size": 10_000}
    engine = engine_for_model(FakeModel(vocab, predict), IdTokenizer(), EngineConfig(block_size=4, seed=11,
                       speculative_config=spec, max_num_seqs=256), max_model_len=16, num_blocks=1200)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, **penalties)
    for i in range(num_requests):
        engine.add_request(str(i), prompt, params)
    results = run_to_completion(engine)
    counts = Counter(tuple(r.outputs[0].token_ids) for r in results.values())
    chi_square = 0.0
    for a in range(vocab):
        for b in range(vocab):
            for c in range(vocab):
                context, p = list(prompt), 1.0
                for token in (a, b, c):
                    p *= probabilities(context)[token]
                    context.append(token)
                expected_count = num_requests * p
                chi_square += (counts[(a, b, c)] - expected_count) ** 2 / expected_count
    stats = engine.spec.stats
    assert stats.num_draft_tokens > num_requests // 2 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert chi_square < 54.1, (chi_square, counts)
    assert_idle(engine)


def test_tensor_parallel_ranks_verify_the_same_drafts(tmp_path):
    """Two CPU ranks (the leader broadcasts each step's inputs, several logits rows per sequence included)
    give one rank's non-speculative tokens."""
    from tests.tp_fixtures import save_tp_model

    model_dir, _ = save_tp_model("llama-kv2", tmp_path / "tp")
    prompts = ([3, 17, 29, 3, 17, 29, 3, 17], [5, 9, 5, 9, 5, 9, 5], [7, 8, 9, 10, 7, 8, 9, 10, 7])
    outputs, drafted = {}, 0
    for tp, spec in ((1, None), (2, NGRAM)):
        engine = build_engine(EngineConfig(
            model=str(model_dir), device="cpu", dtype="float32", kernel_backend="torch", tensor_parallel_size=tp,
            block_size=4, max_model_len=64, mxfp4_unpack_gib=0, speculative_config=spec), num_blocks=48)
        try:
            for i, prompt in enumerate(prompts):
                engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            outputs[tp] = {rid: out.outputs[0].token_ids for rid, out in run_to_completion(engine).items()}
            assert_idle(engine)
            drafted = engine.spec.stats.num_draft_tokens if spec else drafted
        finally:
            engine.close()
    assert outputs[2] == outputs[1] and drafted > 0, (outputs, drafted)


def test_seeded_sampling_is_identical_with_speculation():
    """A seeded row draws once per verified position; its generator is rewound to one draw per emitted token,
    so every later token is the one non-speculative decoding draws (n=2: seeds s and s+1)."""
    results = {}
    for spec in (None, NGRAM):
        engine = engine_for_model(FakeModel(5, wobbly), IdTokenizer(), EngineConfig(block_size=4, speculative_config=spec),
                           max_model_len=64, num_blocks=64)
        for i, temperature in enumerate((0.3, 0.7, 1.0)):
            engine.add_request(str(i), [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(
                temperature=temperature, seed=100 + i, n=2, max_tokens=30, ignore_eos=True))
        results[spec is not None] = {rid: [o.token_ids for o in out.outputs]
                                     for rid, out in run_to_completion(engine).items()}
        assert_idle(engine)
    stats = engine.spec.stats
    assert results[True] == results[False]
    assert stats.num_accepted_tokens > 0 and stats.num_draft_tokens > stats.num_accepted_tokens


def test_drafts_priced_out_still_teach_the_acceptance_estimate():
    """Rows that only a high acceptance rate pays for: at the prior (one half) nothing is verified, but each draft
    left unverified is checked against the tokens drawn after it, so a sequence whose drafts keep landing earns
    verification."""
    engine = engine_for_model(FakeModel(5, fibonacci), IdTokenizer(), EngineConfig(speculative_config=NGRAM),
                              max_model_len=64, num_blocks=16)
    engine.spec.step_cost = StepCost((1, 2, 5), (10.0, 16.0, 22.0), key_ms=0.0)  # a draft row: 0.6 of a step
    assert engine.spec.step_cost.choose(1, 10, [(4, 10, 0.5, 0.5)]) == [0]
    prompt = [1, 2, 3, 0, 3, 3, 1, 4, 0, 4]
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    result = run_to_completion(engine)["r"]
    assert result.outputs[0].token_ids == expected(prompt, 48, 5, fibonacci)
    assert engine.spec.stats.num_accepted_tokens > 0
    assert_idle(engine)


def test_cpu_engines_measure_what_a_draft_row_costs():
    """The builder times the served model at several row counts; more rows never come out cheaper."""
    cost = make_engine(speculative_config=NGRAM).spec.step_cost
    assert cost is not None and len(cost.rows) > 2 and cost.key_ms >= 0
    assert list(cost.rows) == sorted(cost.rows) and list(cost.rows_ms) == sorted(cost.rows_ms)
