"""The engine's first sampler, row by row on the host: the reference the batched sampler is tested against.

Kept as it was (plain torch, one row at a time, a full sort for every sampled row) because it is
simple enough to check by reading; tests/test_sampler.py compares distributions and seeded draws.

Order (vLLM's): min_tokens masking, repetition/presence/frequency penalties, logprobs (of the
penalised distribution at temperature 1), then temperature, top-k, top-p, min-p and a draw.
A draw is `argmax(probs / q)` with `q ~ Exp(1)` (the exponential race), so a row with its own
seeded generator gets the same token whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams


@dataclass
class ReferenceRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None = None
    banned_token_ids: Seq[int] = ()  # EOS / stop ids while fewer than min_tokens were generated


@dataclass
class ReferenceResult:
    token_ids: list[int]
    logprobs: list[float] | None  # chosen token's logprob per row (None when no row asked)
    top_logprobs: list[list[tuple[int, float]]] | None


def apply_penalties(logits: torch.Tensor, rows: Seq[ReferenceRow]) -> None:
    """In place: repetition penalty over prompt+output tokens, presence/frequency over output tokens."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if row.banned_token_ids:
            logits[i, torch.tensor(list(row.banned_token_ids), dtype=torch.long)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
            if seen.numel():
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                              values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            counts = torch.bincount(torch.tensor(list(row.output_token_ids), dtype=torch.long),
                                    minlength=vocab)[:vocab].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k (0 = off), top-p (1 = off) and min-p (0 = off) exclude, row by row."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    drop = ranks >= k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop = before >= top_p.unsqueeze(1)
    drop[:, 0] = False
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class ReferenceSampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Seq[ReferenceRow]) -> ReferenceResult:
        logits = logits.float().cpu()
        apply_penalties(logits, rows)
        want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        logprobs = top = None
        log_probs = logits.log_softmax(dim=-1) if want else None
        greedy = logits.argmax(dim=-1)
        chosen = greedy.clone()
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = torch.tensor(sampled)
            sub = logits[index] / torch.tensor([rows[i].params.temperature for i in sampled]).unsqueeze(1)
            sub = filter_logits(
                sub,
                torch.tensor([rows[i].params.top_k for i in sampled]),
                torch.tensor([rows[i].params.top_p for i in sampled], dtype=torch.float32),
                torch.tensor([rows[i].params.min_p for i in sampled], dtype=torch.float32),
            )
            probs = sub.softmax(dim=-1)
            noise = torch.stack([self._exponential(probs.shape[-1], rows[i].generator) for i in sampled])
            chosen[index] = (probs / noise).argmax(dim=-1)
        if log_probs is not None:
            logprobs = log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
            top = []
            for i, row in enumerate(rows):
                k = row.params.logprobs or 0
                values, ids = log_probs[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
                top.append(list(zip(ids.tolist(), values.tolist())))
        return ReferenceResult(chosen.tolist(), logprobs, top)

    def _exponential(self, size: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.empty(size).exponential_(generator=generator or self.generator)
