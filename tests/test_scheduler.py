"""Scheduler properties with a fake paged model: budgets hold, no block leaks, every request finishes right."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.kv_cache import BlockPool
from engine.builder import engine_for_model
from engine.outputs import RequestAccumulator
from engine.request import Sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from tests.engine_testing import assert_idle
from tests.fake_model import FakeModel, IdTokenizer, next_token


def expected(prompt: list[int], max_tokens: int, vocab: int) -> list[int]:
    context = list(prompt)
    for _ in range(max_tokens):
        context.append(next_token(context, vocab))
    return context[len(prompt):]


requests = st.lists(st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=30), st.integers(1, 8),
                              st.integers(0, 12), st.booleans()), min_size=1, max_size=10)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(10, 24), st.sampled_from([2, 4]), st.integers(1, 5), st.integers(4, 40),
       st.booleans(), st.booleans())
def test_random_traffic(reqs, num_blocks, block_size, max_seqs, budget, chunked, prefix):
    config = EngineConfig(block_size=block_size, max_num_seqs=max_seqs, max_num_batched_tokens=budget if chunked else 64,
                          enable_chunked_prefill=chunked, enable_prefix_caching=prefix)
    max_len = min(num_blocks * block_size, 38)
    engine = engine_for_model(FakeModel(), IdTokenizer(), config, max_model_len=max_len, num_blocks=num_blocks)
    pending = list(enumerate(reqs))
    merged, finals, aborted, step = {}, {}, set(), 0
    while pending or engine.has_unfinished():
        # arrivals: one request joins at each step whose index matches its arrival delay
        for i, (prompt, max_tokens, arrive, abort) in list(pending):
            if arrive <= step:
                pending.remove((i, (prompt, max_tokens, arrive, abort)))
                engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=min(max_tokens, max_len - len(prompt)), ignore_eos=True)) if len(prompt) < max_len else None
        batch_check = engine.scheduler
        outs = engine.step()
        step += 1
        assert len(batch_check.running) <= max_seqs
        for out in outs:
            assert out.request_id not in finals
            merged.setdefault(out.request_id, RequestAccumulator()).add(out)
            if out.finished:
                finals[out.request_id] = merged[out.request_id].result(out.request_id)
        for i, (prompt, _, arrive, abort) in enumerate(reqs):
            if abort and arrive + 2 == step and str(i) in engine.requests:
                finals[str(i)] = engine.abort(str(i))
                aborted.add(str(i))
        used = len({b for s in engine.scheduler.running for b in s.block_ids})
        assert used <= engine.pool.num_used <= num_blocks
        assert step < 2000, "no progress"
    admitted = {str(i) for i, (p, *_rest) in enumerate(reqs) if len(p) < max_len}
    assert set(finals) == admitted
    for rid, out in finals.items():
        prompt, max_tokens = reqs[int(rid)][0], min(reqs[int(rid)][1], max_len - len(reqs[int(rid)][0]))
        if rid not in aborted:
            assert out.outputs[0].token_ids == expected(prompt, max_tokens, 97)
            assert out.outputs[0].finish_reason == "length"
    assert_idle(engine)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.integers(1, 6), st.integers(1, 50))
def test_schedule_respects_budget(lengths, max_seqs, budget):
    pool = BlockPool(64, 4)
    scheduler = Scheduler(pool, max_seqs, budget)
    for n in lengths:
        scheduler.add(Sample("r", 0, list(range(n)), SamplingParams(), 1))
    while scheduler.has_work:
        batch = scheduler.schedule()
        assert 0 < batch.num_tokens <= budget and len(batch.items) <= max_seqs
        assert len({id(s) for s, _ in batch.items}) == len(batch.items)
        scheduler.after_step(batch)
        for seq, _ in batch.items:
            if seq.num_remaining == 0:
                scheduler.remove(seq)
    assert pool.num_free == 64


def test_oldest_request_is_never_preempted():
    pool = BlockPool(6, 2, enable_prefix_caching=False)
    scheduler = Scheduler(pool, 8, 64)
    seqs = [Sample(str(i), 0, [1, 2, 3], SamplingParams(), 8) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    for _ in range(6):
        batch = scheduler.schedule()
        scheduler.after_step(batch)
        for seq, _ in batch.items:
            if seq.num_remaining == 0:
                seq.output_token_ids.append(0)
        assert seqs[0] in scheduler.running
    assert scheduler.num_preemptions > 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 6), st.integers(0, 6)), min_size=2, max_size=6),
       st.integers(3, 10), st.integers(2, 9))
def test_preempted_tokens_return_to_the_budget(seqs, num_blocks, budget):
    """A scheduled sequence preempted as a victim gives its tokens back: a clipped chunk means a full step."""
    pool = BlockPool(num_blocks, 2, enable_prefix_caching=False)
    scheduler = Scheduler(pool, 8, budget)
    pending = [(arrival, Sample("r", 0, list(range(prompt)), SamplingParams(), outputs))
               for prompt, outputs, arrival in seqs if -(-(prompt + outputs) // 2) <= num_blocks]  # each fits alone
    for step in range(500):
        for arrival, seq in [p for p in pending if p[0] <= step]:
            scheduler.add(seq)
            pending.remove((arrival, seq))
        if not (pending or scheduler.has_work):
            break
        batch = scheduler.schedule()
        if any(count < seq.num_remaining for seq, count in batch.items):
            assert batch.num_tokens == budget
        scheduler.after_step(batch)
        for seq, _ in batch.items:
            if seq.num_remaining == 0:
                seq.output_token_ids.append(0)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    scheduler.remove(seq)
    assert not scheduler.has_work and pool.num_free == num_blocks
