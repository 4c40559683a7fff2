"""Proposers (n-gram, suffix with its global cache), the back-off, the acceptance rule and the config parser."""

from __future__ import annotations

import random

import pytest

from engine.config import ConfigError
from engine.spec_decode.adaptive import MAX_PAUSE, Backoff
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramIndex, NgramProposer
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
    backoff = Backoff()
    pauses = []
    for _ in range(10):
        backoff.observe(5, 0)
        steps = 0
        while not backoff.ready():
            steps += 1
        pauses.append(steps)
    assert pauses == [0, 0, 1, 2, 4, 8, 16, 32, MAX_PAUSE, MAX_PAUSE]  # one bad step alone never pauses
    backoff.observe(5, 5)
    backoff.observe(5, 0)  # after a success the next pause starts short again
    assert backoff.ready() is True
    backoff.observe(5, 0)
    assert [backoff.ready(), backoff.ready()] == [False, True]


def test_backoff_drafts_in_proportion_to_acceptance():
    backoff = Backoff()
    assert backoff.allowance(5) == 5
    backoff.observe(4, 2)  # half accepted: the average moves from 1.0 to 0.75
    assert backoff.allowance(5) == 4 and backoff.allowance(1) == 1
    backoff.observe(4, 0)
    assert backoff.allowance(5) == 2


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
