"""Per-sequence acceptance: how likely each next draft is to be accepted, and back-off when drafts keep failing.

A verified step decides its drafts one position at a time until the first rejection. Two rates are
kept: `first`, that a step's first draft is accepted, and `later`, that a draft is accepted once the
one before it was (draft j is emitted with probability first * later^(j-1): the step cost model in
step_cost.py prices it so). They are kept apart because evidence about one says little about the
other: first-draft hits once priced 14-draft verifications as if every position were as sure (chat
at 4 streams: 11.2 tokens expected, 7 accepted).

Each rate is (accepted + prior) / (decided + prior weight) over decided positions, each position's
evidence fading by `MEMORY` per later one, so a handful of positions cannot move a rate far from the
prior of one half while a verified step of twenty positions outweighs what came before it. Drafts the
step cost leaves unverified are evidence too, a position at a time (decoder.py). When `first` falls
below `LOW_ACCEPTANCE` the sequence also stops proposing (saving the proposer's host time) for a
number of steps that doubles on every further failure (up to `MAX_PAUSE`) and resets once drafts are
accepted again (the rate is set back to `LOW_ACCEPTANCE` at each pause, so one success lifts it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOW_ACCEPTANCE = 0.25  # below this first-draft acceptance rate, pause
PRIOR_RATE = 0.5  # what a rate is before anything is known
PRIOR_POSITIONS = 1.0  # ... worth this many decided positions of evidence
MEMORY = 0.95  # a decided position's weight fades by this much with each one decided after it (~20 remembered)
MAX_PAUSE = 64  # steps


@dataclass
class Rate:
    accepted: float = 0.0  # fading sums over decided positions
    decided: float = 0.0

    @property
    def value(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_POSITIONS) / (self.decided + PRIOR_POSITIONS)

    def add(self, accepted: int, decided: int) -> None:
        """`decided` more positions, the first `accepted` of them accepted (a run ends at its rejection)."""
        fade = MEMORY ** decided
        self.accepted = fade * self.accepted + (1 - MEMORY ** accepted) / (1 - MEMORY) * MEMORY ** (decided - accepted)
        self.decided = fade * self.decided + (1 - fade) / (1 - MEMORY)

    def raise_to(self, rate: float) -> None:
        """Forget failures until the rate is `rate`, so that one success after a pause lifts it above."""
        self.accepted = max(self.accepted, rate * (self.decided + PRIOR_POSITIONS) - PRIOR_RATE * PRIOR_POSITIONS)


@dataclass
class Acceptance:
    first: Rate = field(default_factory=Rate)  # the first draft of a step is accepted
    later: Rate = field(default_factory=Rate)  # draft j + 1 is accepted, given draft j was

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        """`num_accepted` of `num_drafted` drafts were accepted (all up to the first rejection)."""
        self.first.add(min(num_accepted, 1), 1)
        later_decided = num_accepted - 1 + (num_accepted < num_drafted)
        if num_accepted and later_decided:
            self.later.add(num_accepted - 1, later_decided)


@dataclass
class Backoff:
    acceptance: Acceptance
    paused_steps: int = 0
    next_pause: int = 1

    def ready(self) -> bool:
        """May the sequence propose this step? (A paused one counts the step down.)"""
        if self.paused_steps:
            self.paused_steps -= 1
            return False
        return True

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.acceptance.observe(num_drafted, num_accepted)
        first = self.acceptance.first
        if first.value < LOW_ACCEPTANCE:
            self.paused_steps = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            first.raise_to(LOW_ACCEPTANCE)
        elif num_accepted:
            self.next_pause = 1
