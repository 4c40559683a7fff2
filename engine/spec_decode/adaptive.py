"""Per-sequence back-off: speculation that keeps being rejected costs verification for nothing.

Each sequence keeps a moving average of the share of its drafted tokens that were accepted.
When it falls below `LOW_ACCEPTANCE` the sequence stops proposing for a number of steps that
doubles on every further failure (up to `MAX_PAUSE`) and resets once drafts are accepted again.
Between pauses it drafts at most its acceptance share of the tokens allowed (at least one), so
a sequence whose drafts are half right verifies half as many positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOW_ACCEPTANCE = 0.25  # below this many accepted tokens per drafted one, pause
SMOOTHING = 0.5  # weight of the newest step in the moving average
MAX_PAUSE = 64  # steps


@dataclass
class Backoff:
    acceptance: float = 1.0  # moving average of accepted / drafted
    paused_steps: int = 0
    next_pause: int = 1

    def ready(self) -> bool:
        """May the sequence propose this step? (A paused one counts the step down.)"""
        if self.paused_steps:
            self.paused_steps -= 1
            return False
        return True

    def allowance(self, max_tokens: int) -> int:
        """How many of `max_tokens` draft tokens the sequence may propose now."""
        return max(1, min(max_tokens, math.ceil(max_tokens * self.acceptance)))

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.acceptance += SMOOTHING * (num_accepted / num_drafted - self.acceptance)
        if self.acceptance < LOW_ACCEPTANCE:
            self.paused_steps = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            self.acceptance = LOW_ACCEPTANCE  # one good step after the pause lifts it back up
        elif num_accepted:
            self.next_pause = 1
