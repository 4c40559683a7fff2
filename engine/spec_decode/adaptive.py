"""Per-sequence acceptance: how likely each next draft is to be accepted, and back-off when drafts keep failing.

A verified step decides its drafts one position at a time until the first rejection, so a sequence's
per-token acceptance rate is (drafts accepted) / (positions decided: the accepted ones plus the
rejected one, if any), kept as a ratio of moving averages; a draft the step cost leaves unverified counts
as one position, decided by the token the step drew (decoder.py). The step cost model (step_cost.py) prices
draft j of a sequence at that rate to the power j. When the rate falls below `LOW_ACCEPTANCE` the
sequence also stops proposing (saving the proposer's host time) for a number of steps that doubles
on every further failure (up to `MAX_PAUSE`) and resets once drafts are accepted again.
"""

from __future__ import annotations

from dataclasses import dataclass

LOW_ACCEPTANCE = 0.25  # below this per-token acceptance rate, pause
SMOOTHING = 0.5  # weight of the newest step in the moving averages
MAX_PAUSE = 64  # steps
PRIOR = (1.0, 2.0)  # (accepted, decided) before anything is known: a rate of one half


@dataclass
class Acceptance:
    accepted: float = PRIOR[0]  # moving average of drafts accepted per verified step
    decided: float = PRIOR[1]  # ... of draft positions decided per verified step

    @property
    def rate(self) -> float:
        return self.accepted / self.decided

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        decided = num_accepted + (num_accepted < num_drafted)
        self.accepted += SMOOTHING * (num_accepted - self.accepted)
        self.decided += SMOOTHING * (decided - self.decided)


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
        acceptance = self.acceptance
        acceptance.observe(num_drafted, num_accepted)
        if acceptance.rate < LOW_ACCEPTANCE:
            self.paused_steps = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            acceptance.accepted = LOW_ACCEPTANCE * acceptance.decided  # one good step after the pause lifts it
        elif num_accepted:
            self.next_pause = 1
