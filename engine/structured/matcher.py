"""One sample's progress through its grammar: which tokens may come next, and whether it is complete.

Speculative decoding checks drafts against it without moving it: a draft is walked and rolled back
(xgrammar's rollback is unlimited), so the matcher only ever advances by tokens the sample emits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar


class GrammarMatcher:
    def __init__(self, matcher: xgrammar.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (the sample must stop)."""
        return bool(self._matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted."""
        return bool(self._matcher.is_terminated())

    def valid_prefix(self, draft: Sequence[int]) -> int:
        """How many of `draft`'s leading tokens the grammar allows from here (none after its stop token)."""
        matcher, accepted = self._matcher, 0
        for token in draft:
            if matcher.is_terminated() or not matcher.accept_token(token):
                break
            accepted += 1
        if accepted:
            matcher.rollback(accepted)
        return accepted

    def fill_bitmasks(self, bitmask: torch.Tensor, first_row: int, draft: Sequence[int] = ()) -> None:
        """Write the allowed next tokens into `bitmask[first_row]` (a CPU int32 tensor) and, when the step verifies
        drafts, into the rows after it: the allowed tokens after each prefix `draft[:j]`, j = 1 .. len(draft), of
        a draft the grammar allows (`valid_prefix`). A row past the stop token is left as it is: its draw is never
        emitted, the sample ends at the stop."""
        matcher = self._matcher
        matcher.fill_next_token_bitmask(bitmask, first_row)
        for j, token in enumerate(draft, 1):
            accepted = matcher.accept_token(token)
            assert accepted, "drafts are cut to their valid prefix when proposed"
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, first_row + j)
        if draft:
            matcher.rollback(len(draft))
