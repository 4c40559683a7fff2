"""Which drafted tokens a step accepts.

The sampler draws one token from the target distribution at each of a sequence's k+1 verified
positions, position j conditioned on the drafts before it. Drafts are accepted while they equal
those draws; the first draw that differs (or the draw after the last draft) is emitted too.
Greedy rows draw the argmax, so this is exact equality with non-speculative decoding. For a
sampling row this is rejection sampling with a deterministic proposer: draft d is accepted with
probability p(d), and a draw conditioned on differing from d is a draw from the residual
max(p - onehot(d), 0) renormalised, so every emitted token has the target distribution.
"""

from __future__ import annotations

from collections.abc import Sequence


def accepted_tokens(draft_token_ids: Sequence[int], drawn_token_ids: Sequence[int]) -> list[int]:
    """The tokens a step emits: the accepted drafts, then the first differing (or bonus) draw."""
    for j, draft in enumerate(draft_token_ids):
        if drawn_token_ids[j] != draft:
            return list(drawn_token_ids[:j + 1])
    return list(drawn_token_ids[:len(draft_token_ids) + 1])
