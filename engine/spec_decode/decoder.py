"""Per step: which running sequences propose drafts and how many; afterwards, what was accepted.

A sequence speculates when it is decoding (its prompt done, no token in flight) and its back-off
allows it. Every row's rules see the drafts before it: a grammar's draft is cut at the first token
the grammar rejects and each verified position gets the grammar's mask after the drafts before it
(engine/structured/matcher.py); a penalised row's counts include them (engine/sampler.py); a seeded
sampling row's generator is rewound by the runner after verification.
How many of the proposed drafts a step verifies is the step cost model's choice (step_cost.py):
only drafts whose expected accepted tokens pay for their rows, so a large batch or a low
acceptance rate verifies few or none; where the cost was not measured (GPU) every draft is verified.
A step with `disable_by_batch_size` running sequences or more does not speculate: on CPU, beside 64
streams the verified drafts' tokens lost chat 3.4% and gained code edit 10%; with the cap at 32 (a batch
draining below it still speculates) chat gained 2.3% and code edit lost 0.7% (bench/spec_decode.py,
docs/benchmarks.md). Drafts never run past `max_tokens` or the context.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from engine.request import Sample
from engine.spec_decode.adaptive import Acceptance, Backoff
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import NgramProposer
from engine.spec_decode.stats import SpecDecodeStats
from engine.spec_decode.step_cost import StepCost, StepScale
from engine.spec_decode.suffix import SuffixProposer


def make_proposer(config: SpeculativeConfig) -> NgramProposer | SuffixProposer:
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return SuffixProposer(config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests,
                          config.suffix_decoding_max_spec_factor, config.suffix_decoding_min_token_prob)


def may_speculate(seq: Sample) -> bool:
    """Decoding, with its last token known: grammars, penalties, seeds and n > 1 all speculate."""
    return not seq.num_in_flight and seq.num_remaining == 1


class SpecDecoder:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config)
        self.stats = SpecDecodeStats(config.num_speculative_tokens)
        self.backoff: dict[Sample, Backoff] = {}
        self.unverified: dict[Sample, tuple[int, list[int], int]] = {}  # a draft not verified: (token count then,
        # the draft, its positions checked)
        self.step_cost: StepCost | None = None  # measured by the builder (CPU)
        self.step_scale = StepScale()  # what the served steps take against step_cost's prediction

    def propose(self, running: Sequence[Sample]) -> None:
        """Set `spec_token_ids` of the running sequences that speculate this step."""
        cap = self.config.disable_by_batch_size
        if cap is not None and len(running) >= cap:
            return
        started = time.perf_counter()
        k = self.config.num_speculative_tokens
        decoding = row_keys = 0
        candidates: list[tuple[Sample, list[int], Acceptance]] = []
        for seq in running:
            if seq.num_remaining != 1:
                continue  # a prompt chunk: its rows are the scheduler's to budget
            decoding += 1
            row_keys += seq.num_tokens
            room = min(k, seq.max_tokens - len(seq.output_token_ids) - 1, self.max_model_len - seq.num_tokens)
            if room <= 0 or not may_speculate(seq):
                continue
            backoff = self.backoff.get(seq)
            if backoff is None:
                backoff = self.backoff[seq] = Backoff(Acceptance())  # the prior: how well drafts land is the request's own
            self._check_unverified(seq, backoff)
            if backoff.ready():
                draft = self.proposer.propose(seq, seq, room)
                if draft and seq.grammar is not None:
                    draft = draft[:seq.grammar.valid_prefix(draft)]
                if draft:
                    candidates.append((seq, draft, backoff.acceptance))
        if candidates:
            if self.step_cost is None:
                counts = [len(draft) for _, draft, _ in candidates]
            else:
                counts = self.step_cost.choose(
                    decoding, row_keys, [(len(draft), seq.num_tokens, acceptance.first.value, acceptance.later.value)
                                         for seq, draft, acceptance in candidates], self.step_scale.relative)
            for (seq, draft, _), count in zip(candidates, counts):
                seq.spec_token_ids = draft[:count]
                if count == len(draft):
                    self.unverified.pop(seq, None)  # verified positions teach the estimate themselves
                elif count:
                    self.unverified[seq] = (seq.num_known_tokens, draft, count)  # its unverified tail
                else:
                    self.unverified.setdefault(seq, (seq.num_known_tokens, draft, 0))
        self.stats.propose_seconds += time.perf_counter() - started

    def observe_step(self, rows: int, row_keys: int, verifying: bool, seconds: float) -> None:
        """A decode-only step took `seconds`: `rows` rows over `row_keys` (row, key) pairs, verifying drafts or not."""
        if self.step_cost is not None:
            self.step_scale.observe(self.step_cost, rows, row_keys, verifying, seconds * 1e3)

    def _check_unverified(self, seq: Sample, backoff: Backoff) -> None:
        """Drafts priced out of their step are still evidence, a position at a time as the tokens drawn since become
        known (greedy: what verifying them would have accepted; sampled: as likely, a draw matching a draft as
        often as rejection sampling accepts it), so an estimate too low to buy verification keeps learning at
        no cost: a whole draft left unverified, or the tail of one whose verified head was all accepted. One
        draft at a time until its first mismatch: overlapping drafts would count a position twice."""
        pending = self.unverified.get(seq)
        if pending is None:
            return
        start, draft, checked = pending
        known = min(seq.num_known_tokens - start, len(draft))
        drawn = seq.token_slice(start, start + known)
        if drawn[:checked] != draft[:min(checked, known)]:  # its verified head was rejected (and counted then)
            del self.unverified[seq]
            return
        for position in range(checked, known):
            hit = drawn[position] == draft[position]
            if position == 0:
                backoff.observe(1, int(hit))
            else:
                backoff.acceptance.later.add(int(hit), 1)
            if not hit:
                del self.unverified[seq]
                return
        if known == len(draft):
            del self.unverified[seq]
        else:
            self.unverified[seq] = (start, draft, max(known, checked))

    def observe(self, seq: Sample, num_drafted: int, num_accepted: int) -> None:
        """Record a verified step of `seq`: `num_accepted` of its `num_drafted` drafts were kept."""
        self.stats.observe(num_drafted, num_accepted)
        seq.num_draft_tokens += num_drafted
        seq.num_accepted_tokens += num_accepted
        backoff = self.backoff.get(seq)
        if backoff is not None:
            backoff.observe(num_drafted, num_accepted)

    def release(self, seq: Sample) -> None:
        """A finished sequence: its proposer state goes (its output may join a global cache)."""
        self.backoff.pop(seq, None)
        self.unverified.pop(seq, None)
        self.proposer.release(seq, seq.output_token_ids)
