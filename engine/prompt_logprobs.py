"""Prompt logprobs: how likely the model found each prompt token given the ones before it (vLLM's
`prompt_logprobs`, OpenAI's `echo` with `logprobs`).

Only a request that asks gets logits for its prompt positions: the runner adds those rows to the
step's logits after the sampled ones, and they are scored here at once (one copy to the host per
step that has any). The first prompt token has nothing before it: its entry is None. Such a request
does not read the prefix cache, so every prompt position is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.step_messages import PromptScores
from engine.token_bytes import token_text


@dataclass
class PromptRows:
    """Logit rows one scheduled item adds for its prompt: `count` positions from `first` within the item."""

    item: int
    first: int
    count: int
    targets: list[int]  # the prompt tokens those positions predict


def rows_to_score(item: int, prompt: list[int], begin: int, count: int, scored: int) -> PromptRows | None:
    """The rows of a chunk `[begin, begin + count)` that predict prompt tokens not scored yet (`scored` of them,
    the first token's None included), or None; a recomputed chunk (after preemption) scores nothing twice."""
    first_target = max(begin + 1, scored)
    last_target = min(begin + count, len(prompt) - 1)
    if last_target < first_target:
        return None
    return PromptRows(item, first_target - 1 - begin, last_target - first_target + 1,
                      prompt[first_target:last_target + 1])


def score(logits: torch.Tensor, targets: list[int], top: int) -> PromptScores:
    """Each row's target token: its logprob, its rank (1 = most likely) and the `top` most likely tokens."""
    logprobs = logits.float().log_softmax(-1)
    index = torch.tensor(targets, device=logits.device).unsqueeze(1)
    chosen = logprobs.gather(1, index)
    ranks = (logprobs > chosen).sum(-1) + 1
    parts = [chosen.flatten(), ranks.float()]
    if top:
        values, ids = logprobs.topk(top, dim=-1)
        parts += [values.flatten(), ids.float().flatten()]
    host = torch.cat(parts).cpu().tolist()  # one copy for the chunk (ids are exact in float32 below 2**24)
    rows = len(targets)
    top_values, top_ids = host[2 * rows:2 * rows + rows * top], host[2 * rows + rows * top:]
    return PromptScores(host[:rows], [int(rank) for rank in host[rows:2 * rows]],
                        [[(int(top_ids[i * top + j]), top_values[i * top + j]) for j in range(top)]
                         for i in range(rows)])


def entries(scores: PromptScores, targets: list[int], token_bytes: Callable[[int], bytes]) -> list[TokenLogprob]:
    """The scored rows as logprob entries with the tokens' text."""
    return [TokenLogprob(target, token_text(token_bytes(target)), logprob,
                         [(t, token_text(token_bytes(t)), lp) for t, lp in top], rank)
            for target, logprob, rank, top in zip(targets, scores.logprobs, scores.ranks, scores.top)]
