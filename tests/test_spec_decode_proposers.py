"""Proposers (n-gram, suffix with its global cache), the acceptance estimate and back-off, the step cost
model's choice of drafts, the acceptance rule and the config parser."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.config import ConfigError
from engine.spec_decode.adaptive import MAX_PAUSE, MEMORY, PRIOR_POSITIONS, PRIOR_RATE, Acceptance, Backoff
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramIndex, NgramProposer
from engine.spec_decode.step_cost import MIN_GAIN, StepCost, StepScale
from engine.spec_decode.suffix import GlobalTrie, SequenceTrie, SuffixProposer
from engine.spec_decode.verify import accepted_tokens


class Tokens:
    """A sequence's known tokens, the shape the proposers read (engine.request.Sample has it)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = list(token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids)

    def token_slice(self, begin: int, end: int) -> list[int]:
        return self.token_ids[begin:end]


def brute_force_ngram(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """The reference: scan backwards for the latest earlier occurrence of the longest matching tail."""
    for n in range(n_max, n_min - 1, -1):
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def test_ngram_proposes_what_followed_the_latest_match():
    index = NgramIndex(2, 3)
    index.extend([5, 6, 7, 8, 9, 5, 6, 7])
    assert index.propose(3) == [8, 9, 5]
    index.extend([1, 2])
    assert index.propose(3) == []  # (1, 2) and (7, 1, 2) never occurred before


@pytest.mark.parametrize("seed", range(20))
def test_ngram_matches_a_brute_force_scan(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 60))]
    n_min = rng.randrange(1, 4)
    n_max = n_min + rng.randrange(3)
    proposer, source = NgramProposer(n_min, n_max), Tokens([])
    for cut in sorted({rng.randrange(len(tokens) + 1) for _ in range(4)} | {len(tokens)}):
        source.token_ids = tokens[:cut]  # tokens arrive in pieces: the index is extended, never rebuilt
        assert proposer.propose("seq", source, 4) == brute_force_ngram(tokens[:cut], n_min, n_max, 4)


def test_suffix_follows_the_most_frequent_continuation():
    trie = SequenceTrie(max_depth=8)
    trie.extend([1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2])
    tokens, score = trie.proposals(lambda length: 4, min_prob=0.0)
    assert tokens[:1] == [3]  # after (1, 2): 3 twice, 4 once
    assert score > 0


def test_suffix_length_adapts_to_the_match():
    proposer = SuffixProposer(max_depth=16, max_cached_requests=4, max_spec_factor=1.0, min_token_prob=0.1)
    text = list(range(10, 20))
    assert proposer.propose("a", Tokens(text + text[:1]), 8) == text[1:2]  # a one-token match proposes one
    assert proposer.propose("b", Tokens(text + text[:5]), 8) == text[5:10]  # a five-token match, five
    unsure = SuffixProposer(max_depth=16, max_cached_requests=4, max_spec_factor=4.0, min_token_prob=0.6)
    # after 7 came 8 once and 9 once: a 50% guess is below min_token_prob, so nothing is proposed
    assert unsure.propose("c", Tokens([7, 8, 1, 7, 9, 2, 7]), 8) == []


def test_suffix_global_cache_serves_other_requests_and_stays_bounded():
    proposer = SuffixProposer(max_depth=8, max_cached_requests=2, max_spec_factor=2.0, min_token_prob=0.1)
    proposer.propose("first", Tokens([0, 1]), 4)
    proposer.release("first", [40, 41, 42, 43, 44])
    assert proposer.propose("second", Tokens([9, 40, 41]), 4) == [42, 43, 44]
    proposer.release("second", [50, 51])
    proposer.release("third", [60, 61])
    assert len(proposer.cache.outputs) == 2
    assert 40 not in proposer.cache.root.children  # the evicted output left no node behind
    assert proposer.propose("fourth", Tokens([9, 40, 41]), 4) == []
    assert not proposer.tries.keys() - {"fourth"}


@pytest.mark.parametrize("seed", range(5))
def test_global_trie_counts_equal_a_rebuild(seed):
    rng = random.Random(seed)
    cache = GlobalTrie(max_depth=4, max_outputs=3)
    outputs = [[rng.randrange(3) for _ in range(rng.randrange(1, 9))] for _ in range(7)]
    for output in outputs:
        cache.add(output)
    rebuilt = GlobalTrie(max_depth=4, max_outputs=3)
    for output in outputs[-3:]:
        rebuilt.add(output)

    def dump(node, prefix=()):
        return {prefix: node.count, **{k: v for t, c in node.children.items() for k, v in dump(c, prefix + (t,)).items()}}
    assert dump(cache.root) == dump(rebuilt.root)


def test_backoff_pauses_longer_after_each_failure_and_recovers():
    backoff = Backoff(Acceptance())
    pauses = []
    for _ in range(10):
        backoff.observe(5, 0)
        steps = 0
        while not backoff.ready():
            steps += 1
        pauses.append(steps)
    assert pauses == [0, 1, 2, 4, 8, 16, 32, MAX_PAUSE, MAX_PAUSE, MAX_PAUSE]  # one bad step alone never pauses
    backoff.observe(5, 5)
    failures = 0
    while backoff.ready():  # after a success the next pause starts short again
        backoff.observe(5, 0)
        failures += 1
    assert failures > 1 and [backoff.ready(), backoff.ready()] == [True, True]  # paused one step


def test_acceptance_is_per_drafted_position_until_the_first_rejection():
    acceptance = Acceptance()
    assert acceptance.first.value == acceptance.later.value == 0.5
    for _ in range(200):
        acceptance.observe(4, 2)  # first accepted; of the later positions the second accepted, the third rejected
    remembered = 1 / (1 - MEMORY)  # decided positions' weights sum to this in the long run
    prior = PRIOR_RATE * PRIOR_POSITIONS
    assert acceptance.first.value == pytest.approx((remembered + prior) / (remembered + PRIOR_POSITIONS), rel=1e-3)
    # accepted, rejected, accepted, ...: an accepted position weighs MEMORY times the rejection after it
    assert acceptance.later.value == pytest.approx((remembered * MEMORY / (1 + MEMORY) + prior)
                                                   / (remembered + PRIOR_POSITIONS), rel=1e-3)
    for _ in range(200):
        acceptance.observe(4, 4)  # all accepted: nothing was rejected
    assert acceptance.first.value == pytest.approx((remembered + prior) / (remembered + PRIOR_POSITIONS))
    assert acceptance.later.value == pytest.approx((remembered + prior) / (remembered + PRIOR_POSITIONS))


def test_first_draft_hits_do_not_vouch_for_later_positions():
    acceptance = Acceptance()
    for _ in range(5):
        acceptance.observe(1, 1)
    assert acceptance.first.value > 0.8 and acceptance.later.value == 0.5


def test_a_few_positions_cannot_move_a_rate_far_from_the_prior():
    acceptance = Acceptance()
    for _ in range(3):
        acceptance.observe(1, 1)
    assert acceptance.first.value < 0.9  # three hits are not a sure thing (a moving average of steps said 0.97)
    acceptance.observe(20, 20)
    assert acceptance.later.value > 0.95  # twenty positions nearly are


def test_step_cost_interpolates_between_measured_row_counts():
    cost = StepCost((1, 4, 16), (10.0, 13.0, 40.0), key_ms=0.01)
    assert cost.ms(1, 0) == 10.0 and cost.ms(4, 100) == 14.0
    assert cost.ms(10, 0) == pytest.approx(13.0 + 27.0 * 6 / 12)
    assert cost.ms(28, 0) == pytest.approx(67.0)  # past the last count: along the last segment


def test_step_cost_verifies_drafts_where_rows_are_cheap_and_none_where_they_are_not():
    cost = StepCost((1, 2, 64, 384), (10.0, 10.2, 40.0, 200.0), key_ms=0.0)
    assert cost.choose(1, 300, [(5, 300, 0.8, 0.8)]) == [5]  # one stream: draft rows cost little
    assert cost.choose(1, 300, [(5, 300, 0.01, 0.01)]) == [0]  # nearly never accepted: not worth even a cheap row
    big = [(5, 300, 0.6, 0.6)] * 64  # 64 streams at a rate of 0.6: each draft row costs more than it brings
    assert cost.choose(64, 64 * 300, big) == [0] * 64
    assert cost.choose(64, 64 * 300, [(5, 300, 1.0, 1.0)] * 64) == [5] * 64  # copying: every draft lands


def test_step_cost_choice_is_the_best_of_every_combination():
    """Draft j is priced at first * later^(j-1); against a brute force over how many drafts each sequence
    verifies, the choice gives the most expected tokens per ms (the likelier sequence gets at least as many)."""
    cost = StepCost((1, 8, 16), (10.0, 10.5, 24.0), key_ms=0.001)
    drafts = [(5, 100, 0.9, 0.9), (5, 300, 0.7, 0.4), (3, 50, 0.9, 0.95), (4, 100, 0.2, 0.9)]

    def rate(counts):
        tokens = 4 + sum(first * later ** (j - 1) for (_, _, first, later), n in zip(drafts, counts)
                         for j in range(1, n + 1))
        keys = 550 + sum(ctx + j for (_, ctx, _, _), n in zip(drafts, counts) for j in range(1, n + 1))
        return tokens / cost.ms(4 + sum(counts), keys)

    counts = cost.choose(4, 550, drafts)
    best = max(itertools.product(*(range(n + 1) for n, _, _, _ in drafts)), key=rate)
    assert rate(counts) == pytest.approx(rate(best)) and sum(counts) > 0
    assert counts[0] >= counts[1] >= counts[3]


def test_step_cost_skips_gains_within_the_measurement_noise():
    cost = StepCost((1, 2), (10.0, 12.5), key_ms=0.0)  # a draft row costs a quarter of the step
    assert cost.choose(1, 0, [(1, 0, 0.25 + MIN_GAIN / 2, 1.0)]) == [0]  # expected +0.8%
    assert cost.choose(1, 0, [(1, 0, 0.4, 1.0)]) == [1]


def test_verifying_steps_slower_than_predicted_verify_less():
    """StepScale learns how verifying steps run against plain ones; the choice prices them so."""
    cost = StepCost((1, 2, 4), (10.0, 12.0, 16.0), key_ms=0.0)
    scale = StepScale()
    for _ in range(50):
        scale.observe(cost, 2, 0, verifying=False, ms=13.2)  # plain steps: 1.1x their prediction
        scale.observe(cost, 4, 0, verifying=True, ms=26.4)  # verifying ones: 1.65x
    assert scale.relative == pytest.approx(1.5, rel=0.01)
    drafts = [(2, 0, 0.7, 0.7)]
    assert cost.choose(2, 0, drafts) == [2]
    assert cost.choose(2, 0, drafts, scale.relative) == [0]


def test_acceptance_rule():
    assert accepted_tokens([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]  # all accepted, plus the bonus draw
    assert accepted_tokens([4, 5, 6], [4, 9, 6, 7]) == [4, 9]  # stop at the first differing draw
    assert accepted_tokens([4], [3, 8]) == [3]
    assert accepted_tokens([], [3]) == [3]


def test_config_parses_vllm_json_and_rejects_mistakes():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    assert (config.method, config.num_speculative_tokens, config.prompt_lookup_max) == ("ngram", 4, 3)
    assert SpeculativeConfig.parse({"method": "suffix"}).suffix_decoding_max_tree_depth == 24
    for bad in ('{"method": "eagle"}', '{"num_speculative_tokens": 3}', "not json",
                '{"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
                '{"method": "ngram", "num_speculative_tokens": 0}', '{"method": "ngram", "draft": 1}', "[1]"):
        with pytest.raises(ConfigError):
            SpeculativeConfig.parse(bad)
