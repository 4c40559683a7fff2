"""Turn a step's logits into tokens on the logits' device: masks, penalties, temperature, filters, a draw.

Order (vLLM's): grammar bitmask, logit_bias, min_tokens bans, repetition/presence/frequency penalties,
logprobs (of the penalised distribution at temperature 1), then temperature, top-k, top-p,
min-p and a draw. A seeded row draws `argmax(probs / q)` with `q ~ Exp(1)` from its own generator (the exponential
race), so it gets the same token whatever else shares the batch; the other rows draw by inverse CDF
(one uniform per row against the cumulative probabilities) in two levels: which block of
`CDF_BLOCK` tokens from the blocks' sums, then which token within it, so on CPU a draw costs a
vectorised sum over the vocabulary instead of a sequential scan of it (or a vocabulary's worth of
exponential noise per row). Rows at temperature 1 skip the division, and a batch whose every row
samples skips the greedy argmax. A speculative verification row's penalties count the drafts before
it, and the counts then keep only the draws the step emits (decided on the device), so each position
is drawn as non-speculative decoding would draw it.

Every per-row parameter is one small tensor uploaded per step, each operation runs once
for the whole batch (or the rows that use it: greedy rows never see noise, only top-p rows
are sorted), and the step's result leaves the device in exactly one copy (`SampleResult`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from engine.host_device import HostCopy, upload
from engine.logit_bias import apply_logit_bias
from engine.sampling_params import SamplingParams

NEG_INF = float("-inf")
CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None = None  # a seeded row's own generator, on the logits' device
    banned_token_ids: Seq[int] = ()  # EOS / stop ids while fewer than min_tokens were generated
    penalty_key: Hashable | None = None  # the sequence whose token counts the penalties read (None: no penalties)
    prompt_token_ids: Seq[int] = ()  # read once, the first time `penalty_key` is seen (repetition penalty)
    drafts_before: Seq[int] = ()  # speculative decoding, a penalised row: the drafts verified before it (it counts them)

    @property
    def penalised(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


class SampleResult:
    """A step's sampled tokens: `device_token_ids` at once, the host lists after the one copy lands."""

    def __init__(self, device_token_ids: torch.Tensor, copy: HostCopy, logprob_rows: list[int], top_k: int) -> None:
        self.device_token_ids = device_token_ids
        self._copy = copy
        self._logprob_rows = logprob_rows
        self._top_k = top_k
        self._resolved = False

    def _resolve(self) -> None:
        flat = self._copy.wait().numpy()
        batch, rows, k = self.device_token_ids.shape[0], len(self._logprob_rows), self._top_k
        self._token_ids: list[int] = flat[:batch].tolist()
        chosen = flat[batch:batch + rows].view(np.float32).tolist()
        top_ids = flat[batch + rows:batch + rows + rows * k].reshape(rows, k).tolist()
        top_values = flat[batch + rows + rows * k:].view(np.float32).reshape(rows, k).tolist()
        self._logprobs: list[float | None] = [None] * batch
        self._top: list[list[tuple[int, float]] | None] = [None] * batch
        for j, row in enumerate(self._logprob_rows):
            self._logprobs[row] = chosen[j]
            self._top[row] = list(zip(top_ids[j], top_values[j]))
        self._resolved = True

    @property
    def token_ids(self) -> list[int]:
        if not self._resolved:
            self._resolve()
        return self._token_ids

    @property
    def logprobs(self) -> list[float | None]:
        """The chosen token's logprob for rows that asked, None for the others."""
        if not self._resolved:
            self._resolve()
        return self._logprobs

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]] | None]:
        """Per asking row the best `(token id, logprob)` pairs (at least as many as it asked for), best first."""
        if not self._resolved:
            self._resolve()
        return self._top


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: -inf where xgrammar's bitmask (bit j of word i allows token 32*i+j) forbids the token.

    Tokens past the mask's width (a model vocab padded beyond the tokenizer's) stay allowed only
    in unconstrained rows (all -1).
    """
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    if allowed.shape[1] < vocab:
        unconstrained = (bitmask == -1).all(dim=-1, keepdim=True)
        allowed = torch.cat([allowed, unconstrained.expand(-1, vocab - allowed.shape[1])], dim=1)
    logits.masked_fill_(~allowed, NEG_INF)


def top_k_mask(logits: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Keep each row's `k` largest logits (ties at the k-th value survive): one `topk`, no sort."""
    kth = logits.topk(max_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, NEG_INF)


def top_k_top_p_mask(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Top-k (0 = off) then top-p over the survivors: a full sort, for the rows that use top-p only."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(k > 0, k, torch.full_like(k, vocab)).clamp(max=vocab)
    sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    drop = before >= p.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, NEG_INF)
    return torch.full_like(logits, NEG_INF).scatter(-1, order, sorted_logits)


def seeded_draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token from a row's `probs` by the exponential race on the row's own generator: the draw does not
    depend on the batch around it, so seeded outputs are batch-invariant."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax()


def _below(total: torch.Tensor) -> torch.Tensor:
    """The largest float below each (positive) `total`: a target that cannot reach past the last mass."""
    return torch.nextafter(total, torch.zeros_like(total))


def skip_seeded_draws(generator: torch.Generator, vocab_size: int, count: int) -> None:
    """Advance `generator` as `count` seeded_draw calls over float32 rows of `vocab_size` would."""
    noise = torch.empty(vocab_size, dtype=torch.float32, device=generator.device)
    for _ in range(count):
        noise.exponential_(generator=generator)


def _emitted(drawn: torch.Tensor, drafts_before: list[Seq[int]], device: torch.device) -> torch.Tensor:
    """Which of a step's penalised rows' draws are emitted, on the device: a verification row's when every draw
    before it in its sequence equalled the draft there (engine/spec_decode/verify.py). A sequence's rows are
    consecutive, the first with no drafts before it; `drawn[i]` is row i's draw."""
    previous_draft = upload([before[-1] if before else -1 for before in drafts_before], torch.long, device)
    first_of = upload([i - len(before) for i, before in enumerate(drafts_before)], torch.long, device)
    previous_drawn = torch.roll(drawn, 1)  # row 0 has no drafts before it: its comparison is not used
    misses = torch.where(previous_draft < 0, 0, (previous_drawn != previous_draft).long()).cumsum(0)
    return misses == misses[first_of]


class TokenCounts:
    """Per sequence, on the device: how often each token was generated and which tokens the prompt holds.

    A sequence gets a row the first time it is sampled with a penalty; each sampled token adds one
    to its row, so penalties never rebuild anything from token lists.
    """

    def __init__(self) -> None:
        self.row_of: dict[Hashable, int] = {}
        self.free: list[int] = []
        self.counts = torch.empty(0, 0, dtype=torch.int32)  # int32 [capacity, vocab], grown on first use
        self.in_prompt = torch.empty(0, 0, dtype=torch.bool)  # bool [capacity, vocab]

    def rows(self, rows: Seq[SamplingRow], vocab: int, device: torch.device) -> list[int]:
        return [self.row_of[r.penalty_key] if r.penalty_key in self.row_of else self._add(r, vocab, device)
                for r in rows]

    def _add(self, row: SamplingRow, vocab: int, device: torch.device) -> int:
        if not self.free:
            self._grow(vocab, device)
        index = self.free.pop()
        self.row_of[row.penalty_key] = index
        self.counts[index].zero_()
        self.in_prompt[index].zero_()
        if row.prompt_token_ids:
            self.in_prompt[index, upload(list(row.prompt_token_ids), torch.long, device)] = True
        return index

    def _grow(self, vocab: int, device: torch.device) -> None:
        old = self.counts.shape[0]
        new = max(8, 2 * old)
        counts = torch.zeros(new, vocab, dtype=torch.int32, device=device)
        in_prompt = torch.zeros(new, vocab, dtype=torch.bool, device=device)
        if old:
            counts[:old] = self.counts
            in_prompt[:old] = self.in_prompt
        self.counts, self.in_prompt = counts, in_prompt
        self.free.extend(range(new - 1, old - 1, -1))

    def add_tokens(self, rows: torch.Tensor, token_ids: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Count `token_ids[i]` for count row `rows[i]`, only where `kept[i]` when given."""
        ones = torch.ones_like(token_ids, dtype=torch.int32) if kept is None else kept.to(torch.int32)
        self.counts.index_put_((rows, token_ids), ones, accumulate=True)

    def release(self, key: Hashable) -> None:
        index = self.row_of.pop(key, None)
        if index is not None:
            self.free.append(index)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.token_counts = TokenCounts()

    def release(self, key: Hashable) -> None:
        """Forget a finished sequence's token counts."""
        self.token_counts.release(key)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: Seq[SamplingRow],
                 token_bitmask: torch.Tensor | None = None) -> SampleResult:
        """Sample one token per row; `token_bitmask` (int32 `[rows, ceil(vocab/32)]`) constrains rows to a grammar."""
        logits = logits.float()
        device = logits.device
        if token_bitmask is not None:
            apply_token_bitmask(logits, token_bitmask)
        apply_logit_bias(logits, [r.params for r in rows])
        self._ban(logits, rows)
        penalised = [i for i, r in enumerate(rows) if r.penalised]
        if penalised:
            index = upload(penalised, torch.long, device)
            counted = upload(self.token_counts.rows([rows[i] for i in penalised], logits.shape[-1], device),
                             torch.long, device)
            drafts_before = [rows[i].drafts_before for i in penalised]
            self._penalise(logits, [rows[i].params for i in penalised], index, counted, drafts_before)
        logprob_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        top_k = max((n for r in rows if (n := r.params.logprobs) is not None), default=0)
        if logprob_rows:
            lp_logits = logits[upload(logprob_rows, torch.long, device)]  # a copy, taken before temperature
            lse = lp_logits.logsumexp(dim=-1, keepdim=True)
        tokens = self._draw(logits, rows)
        parts = [tokens.to(torch.int32)]
        if logprob_rows:
            chosen = lp_logits.gather(1, tokens[upload(logprob_rows, torch.long, device)].unsqueeze(1)) - lse
            parts.append(chosen.flatten().view(torch.int32))
            if top_k:
                values, ids = lp_logits.topk(top_k, dim=-1)
                parts += [ids.to(torch.int32).flatten(), (values - lse).flatten().view(torch.int32)]
        if penalised:
            drawn = tokens[index]
            self.token_counts.add_tokens(counted, drawn, _emitted(drawn, drafts_before, device)
                                         if any(drafts_before) else None)
        packed = torch.cat(parts) if len(parts) > 1 else parts[0]
        return SampleResult(tokens, HostCopy(packed), logprob_rows, top_k)

    def _ban(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> None:
        row_index = [i for i, r in enumerate(rows) for _ in r.banned_token_ids]
        if row_index:
            token_index = [t for r in rows for t in r.banned_token_ids]
            logits[upload(row_index, torch.long, logits.device), upload(token_index, torch.long, logits.device)] = NEG_INF

    def _penalise(self, logits: torch.Tensor, params: list[SamplingParams], index: torch.Tensor,
                  counted: torch.Tensor, drafts_before: list[Seq[int]]) -> None:
        """Repetition over prompt+output tokens, presence/frequency over output tokens, from the count rows; a
        verification row's output tokens include the drafts before it, as if they had been drawn."""
        device = logits.device
        values = upload([[p.repetition_penalty, p.presence_penalty, p.frequency_penalty] for p in params],
                        torch.float32, device)
        repetition, presence, frequency = (values[:, j:j + 1] for j in range(3))
        counts = self.token_counts.counts[counted].float()
        if any(drafts_before):
            row_index = [j for j, before in enumerate(drafts_before) for _ in before]
            token_index = [t for before in drafts_before for t in before]
            counts.index_put_((upload(row_index, torch.long, device), upload(token_index, torch.long, device)),
                              torch.ones(len(row_index), device=device), accumulate=True)
        generated = counts > 0
        seen = generated | self.token_counts.in_prompt[counted]
        sub = logits[index]
        sub = torch.where(seen, torch.where(sub > 0, sub / repetition, sub * repetition), sub)
        sub = sub - frequency * counts - presence * generated.float()
        logits[index] = sub

    def _draw(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """Greedy rows take the argmax; the others race exponential noise through their filtered probabilities."""
        device, vocab = logits.device, logits.shape[-1]
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return logits.argmax(dim=-1)
        index = None if len(sampled) == len(rows) else upload(sampled, torch.long, device)
        params = [rows[i].params for i in sampled]
        sub = logits if index is None else logits[index]  # a copy: `logits` keeps the greedy rows' values
        values = upload([[p.temperature, p.top_p, p.min_p, max(p.top_k, 0)] for p in params], torch.float32, device)
        if any(p.temperature != 1.0 for p in params):
            sub.div_(values[:, :1])
        top_p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
        top_k_rows = [j for j, p in enumerate(params) if p.top_k > 0 and p.top_p >= 1.0]
        if top_p_rows:
            sub = self._on_rows(sub, top_p_rows, lambda x, v: top_k_top_p_mask(x, v[:, 3].long(), v[:, 1]), values)
        if top_k_rows:
            max_k = min(max(params[j].top_k for j in top_k_rows), vocab)
            sub = self._on_rows(sub, top_k_rows,
                                lambda x, v: top_k_mask(x, v[:, 3].long().clamp(max=vocab), max_k), values)
        probs = sub.softmax(dim=-1)
        min_p_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
        if min_p_rows:
            probs = self._on_rows(probs, min_p_rows, lambda x, v: x.masked_fill(
                x < v[:, 2:3] * x.max(dim=-1, keepdim=True).values, 0.0), values)
        chosen = self._inverse_cdf(probs, self._generator(device))
        for j, i in enumerate(sampled):
            generator = rows[i].generator
            if generator is not None:  # the exponential race on the row's own stream: batch-invariant
                chosen[j] = seeded_draw(probs[j], generator)
        if index is None:
            return chosen
        tokens = logits.argmax(dim=-1)  # the greedy rows' tokens
        tokens[index] = chosen
        return tokens

    @staticmethod
    def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One draw per row from one uniform per row, in two levels: the block of CDF_BLOCK tokens the uniform
        falls in (a cumulative sum of the blocks' sums), then the token within that block.

        `right=True` never lands on a zero-probability block or token (its cumulative mass equals its
        predecessor's); each level's target is kept strictly below its total so rounding cannot either.
        """
        num_rows, vocab = probs.shape
        full = vocab // CDF_BLOCK * CDF_BLOCK
        sums = probs[:, :full].reshape(num_rows, -1, CDF_BLOCK).sum(dim=-1)
        if full < vocab:
            sums = torch.cat([sums, probs[:, full:].sum(dim=-1, keepdim=True)], dim=1)
        block_cdf = sums.cumsum(dim=-1)
        total = block_cdf[:, -1:]
        target = torch.minimum(torch.rand(num_rows, 1, device=probs.device, generator=generator) * total, _below(total))
        block = torch.searchsorted(block_cdf, target, right=True).clamp(max=sums.shape[1] - 1)
        starts = block * CDF_BLOCK
        columns = starts + torch.arange(CDF_BLOCK, device=probs.device)
        inside = probs.gather(1, columns.clamp(max=vocab - 1)).masked_fill_(columns >= vocab, 0.0)
        inner_cdf = inside.cumsum(dim=-1)
        offset = (target - (block_cdf.gather(1, block) - sums.gather(1, block))).clamp(min=0.0)
        offset = torch.minimum(offset, _below(inner_cdf[:, -1:]))
        within = torch.searchsorted(inner_cdf, offset, right=True).clamp(max=CDF_BLOCK - 1)
        return (starts + within).squeeze(1).clamp(max=vocab - 1)

    @staticmethod
    def _on_rows(x: torch.Tensor, rows: list[int], op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 values: torch.Tensor) -> torch.Tensor:
        """`op(x[rows], values[rows])` written back into those rows; all rows without indexing."""
        if len(rows) == x.shape[0]:
            return op(x, values)
        index = upload(rows, torch.long, x.device)
        x[index] = op(x[index], values[index])
        return x

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]
