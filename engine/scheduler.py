"""Continuous batching: FCFS queues, a token budget per step, chunked prefill, prefix reuse, preemption.

One rule (vLLM v1): each sequence has `num_computed_tokens` of `num_tokens`; a step gives each
scheduled sequence some new tokens to compute. Running sequences come first (decodes, then
unfinished prefill chunks), then waiting ones in arrival order. When blocks run out the newest
running sequence is preempted (blocks freed, `num_computed_tokens = 0`, back to the head of the
queue), so the oldest request always makes progress.

Under async scheduling a sequence may have a token in flight (sampled on the device, not read
back): it counts in `num_tokens`, so the sequence is scheduled as a decode whose input the runner
reads on the device; a grammar-constrained sequence waits for it instead (its mask needs the token),
and a preempted one is not readmitted until it lands.

Speculative decoding: a decode's drafted tokens (`spec_token_ids`) are budgeted like prefill
tokens, from what the step's other decodes leave and only with blocks no other decode needs, so
drafts never cause a preemption; the step computes them all and `rollback` forgets the rejected ones.

On CPU the step's budget also follows latency (`step_budget`): beside running decodes, prompt chunks
are cut to what the step cost model (engine/step_budget.py) predicts keeps the step within a small
multiple of the decodes' step alone at the chunk's context. Where even a small chunk would not fit (a
long prompt's later chunks reread all its context), the chunk is split by layers (`SplitChunk`): the
following steps each run the decodes and the chunk's next group of layers (the runner keeps its hidden
state in between), and its tokens count as computed, are published to the prefix cache and sample
only after its last layer. Meanwhile no other prompt is scheduled; a preempted or finished sequence
drops its chunk, which starts over from its first layer when it runs again. Only the CPU budget splits
(one process: the tensor-parallel executor runs whole forwards), and drafts never come from a sequence
with a chunk in flight (its prompt is not done).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.kv_cache import BlockPool, block_hashes, chain_hash
from engine.request import Sample, SampleStatus
from engine.step_budget import StepBudget, StepWork


LARGE_GPU_BYTES = 70 * 2**30


def default_max_num_seqs(device: torch.device) -> int:
    """Sequences running at once when the config leaves it open: vLLM's 1024 on a large GPU (an H100's
    80 GB serving gpt-oss), 256 on a smaller one, 128 on CPU where each step's host work is the limit."""
    if device.type == "cuda":
        return 1024 if torch.cuda.get_device_properties(device).total_memory >= LARGE_GPU_BYTES else 256
    return 128


@dataclass
class ScheduledBatch:
    """What one step computes: `(sequence, number of new tokens)` pairs, in batch order."""

    items: list[tuple[Sample, int]] = field(default_factory=list)
    preempted: list[Sample] = field(default_factory=list)  # sent back to the waiting queue by this step
    layer_span: tuple[int, int] | None = None  # the last item, a split chunk, runs only these layers this step
    chunk_pending: bool = False  # ... and has layers left: its tokens are not computed after this step
    layer_share: float = 1.0  # the share of the model's layers the step's prompt chunk runs

    @property
    def num_preempted(self) -> int:
        return len(self.preempted)

    @property
    def num_tokens(self) -> int:
        return sum(count for _, count in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


@dataclass
class SplitChunk:
    """A prompt chunk run `layers_per_step` of the model's layers per step beside running decodes."""

    seq: Sample
    count: int
    layers_per_step: int
    num_layers: int
    layers_done: int = 0

    def next_span(self, beside_decodes: bool) -> tuple[int, int]:
        """The layers of its next step: one group, or all that are left once no decode waits on it."""
        end = self.layers_done + self.layers_per_step if beside_decodes else self.num_layers
        return self.layers_done, min(end, self.num_layers)


def splittable(seq: Sample) -> bool:
    """Whether a chunk of `seq` may run its layers over several steps: not when its rows are scored (prompt logprobs
    read every row's logits at the step that computes it)."""
    return seq.params.prompt_logprobs is None


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        # Caps prompt tokens beside running decodes by predicted step time (engine/step_budget.py); None = no cap.
        self.latency_budget: StepBudget | None = None
        self.split: SplitChunk | None = None  # a prompt chunk part-way through its layers
        self.waiting: deque[Sample] = deque()
        self.running: list[Sample] = []  # oldest first
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sample) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sample) -> None:
        """Take `seq` out wherever it is (it finished or was aborted) and free its blocks now."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SampleStatus.FINISHED

    def step_budget(self, decodes: list[tuple[Sample, int]]) -> int:
        """Tokens this step may compute: `max_num_batched_tokens`, or, while `decodes` are decoding and a
        latency budget is set, their tokens and drafts plus the prompt tokens the budget allows at the next
        prompt's context (so a long prompt's chunks hold each stream's next token to a small multiple of its usual
        wait), or only theirs in the step that measures them alone. Drafts are the streams' own tokens, priced by
        speculation's step cost (engine/spec_decode/step_cost.py): the latency budget is for prompt chunks, and
        had it cut drafts too, first come first served, most of those chosen at 16 streams were dropped
        (code edit: 1,626 of 3,933 verified, 78 steps against 29)."""
        if self.latency_budget is None or not decodes:
            return self.max_num_batched_tokens
        decode_tokens = min(sum(count + len(seq.spec_token_ids) for seq, count in decodes), self.max_num_batched_tokens)
        if self.latency_budget.wants_alone_step():
            return decode_tokens
        spare = self.max_num_batched_tokens - decode_tokens
        prompt, work = self._next_prompt(), StepWork.of(decodes)
        if prompt is None:
            return decode_tokens + self.latency_budget.prefill_tokens(work, 0, spare)
        if splittable(prompt):
            return decode_tokens + self.latency_budget.plan(work, prompt.num_computed_tokens,
                                                            min(spare, prompt.num_remaining))
        return decode_tokens + self.latency_budget.prefill_tokens(work, prompt.num_computed_tokens, spare)

    def _next_prompt(self) -> Sample | None:
        """The prompt the step's chunk comes from: a running prefill, else the queue head."""
        for seq in self.running:
            if seq.num_remaining > 1:
                return seq
        return self.waiting[0] if self.waiting else None

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        if self.split is not None:
            self._continue_split(batch, self.split)
            return batch
        # Decodes first, then prefill chunks of already running sequences (`running` is in arrival order).
        remaining = [(seq, seq.num_remaining) for seq in self.running]
        decodes = [item for item in remaining if item[1] <= 1]
        step_budget = self.step_budget(decodes)
        self._schedule_running(batch, decodes + [item for item in remaining if item[1] > 1], step_budget)
        budget = step_budget - batch.num_tokens
        if batch.num_preempted == 0:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                if seq.num_in_flight or not self._admit(seq, budget):  # preempted with a token still in flight
                    break
                self.waiting.popleft()
                seq.status = SampleStatus.RUNNING
                self.running.append(seq)
                self.running.sort(key=lambda s: s.arrival)
                count = min(seq.num_remaining, budget)
                batch.items.append((seq, count))
                budget -= count
        self._maybe_split(batch)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, order: list[tuple[Sample, int]], budget: int) -> None:
        """Add running sequences' `(sequence, tokens wanted)` in `order` while `budget` lasts, growing their blocks
        and preempting the newest running sequence when blocks run out."""
        size = self.pool.block_size
        decodes_after = sum(1 for _, count in order if count <= 1)
        for seq, count in order:
            if budget == 0:
                break
            if count <= 1:
                decodes_after -= 1
            if seq.status is not SampleStatus.RUNNING:
                continue  # preempted earlier in this loop
            if seq.num_in_flight and seq.grammar is not None:
                continue  # async scheduling: a grammar needs the pending token before it can mask the next one
            count = min(count, budget)
            if seq.spec_token_ids:
                count += self._fit_drafts(seq, budget - count - decodes_after, decodes_after)
            if seq.num_computed_tokens + count <= len(seq.block_ids) * size:  # its blocks hold the new tokens
                batch.items.append((seq, count))
                budget -= count
                continue
            while not self._grow(seq, seq.num_computed_tokens + count):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                budget += sum(c for s, c in batch.items if s is victim)  # a scheduled victim's tokens come back
                batch.items = [(s, c) for s, c in batch.items if s is not victim]
                if victim is seq:
                    break
                count = min(seq.num_remaining, budget)
            if seq.status is SampleStatus.RUNNING:
                batch.items.append((seq, count))
                budget -= count

    def _maybe_split(self, batch: ScheduledBatch) -> None:
        """Split the step's one prompt chunk by layers where the budget says a whole one beside the step's decodes
        would hold them too long (engine/step_budget.py, `layers_per_step`)."""
        budget = self.latency_budget
        if budget is None or budget.num_layers == 1 or len(batch.items) < 2:
            return
        seq, count = batch.items[-1]
        decodes = batch.items[:-1]
        if seq.num_remaining <= 1 or any(s.num_remaining > 1 for s, _ in decodes) or not splittable(seq):
            return  # no prompt chunk, or more than one, or one whose every row is scored
        per_step = budget.layers_per_step(StepWork.of(decodes), seq.num_computed_tokens, count)
        if per_step < budget.num_layers:
            self.split = SplitChunk(seq, count, per_step, budget.num_layers)
            self._mark_span(batch, self.split, beside_decodes=True)

    def _continue_split(self, batch: ScheduledBatch, split: SplitChunk) -> None:
        """The decodes, then the split chunk's next group of layers (no other prompt meanwhile)."""
        decodes = [(seq, seq.num_remaining) for seq in self.running if seq.num_remaining <= 1]
        self._schedule_running(batch, decodes, self.max_num_batched_tokens - split.count)
        if self.split is split:  # not preempted for the decodes' blocks
            beside_decodes = bool(batch.items)
            batch.items.append((split.seq, split.count))
            self._mark_span(batch, split, beside_decodes)

    @staticmethod
    def _mark_span(batch: ScheduledBatch, split: SplitChunk, beside_decodes: bool) -> None:
        start, end = split.next_span(beside_decodes)
        batch.layer_span, batch.chunk_pending = (start, end), end < split.num_layers
        batch.layer_share = (end - start) / split.num_layers

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and publish newly full blocks to the prefix cache."""
        caching, size = self.pool.enable_prefix_caching, self.pool.block_size
        if batch.layer_span is not None and self.split is not None:
            self.split.layers_done = batch.layer_span[1]
            if not batch.chunk_pending:
                self.split = None
        for seq, count in batch.items[:-1] if batch.chunk_pending else batch.items:
            seq.num_computed_tokens += count
            if not seq.prompt_done:
                seq.prompt_done = seq.num_computed_tokens >= len(seq.prompt_token_ids)
            if caching and seq.num_computed_tokens >= (seq.num_committed_blocks + 1) * size:
                self._commit_full_blocks(seq)

    def rollback(self, seq: Sample) -> None:
        """After verification: only the accepted tokens' KV counts; blocks past the sequence's tokens go back."""
        seq.num_computed_tokens = seq.num_tokens - 1
        keep = -(-seq.num_tokens // self.pool.block_size)
        if len(seq.block_ids) > keep:
            self.pool.free(seq.block_ids[keep:])
            del seq.block_ids[keep:]
            seq.block_table_version += 1  # the runner rewrites its row: later blocks may differ

    def _fit_drafts(self, seq: Sample, spare_tokens: int, decodes_after: int) -> int:
        """How many of `seq`'s drafts this step verifies (the rest are dropped): what the budget and the blocks
        allow while every later decode still gets its token and, at worst, one new block."""
        drafts = seq.spec_token_ids[:max(spare_tokens, 0)]
        if drafts:
            end = seq.num_computed_tokens + 1 + len(drafts)
            needed = -(-end // self.pool.block_size) - len(seq.block_ids)
            if needed > self.pool.num_free - decodes_after or not self._grow(seq, end):
                drafts = []
        seq.spec_token_ids = drafts
        return len(drafts)

    def _admit(self, seq: Sample, budget: int) -> bool:
        lead = seq.lead
        if lead is not None and self.pool.enable_prefix_caching and not (lead.prompt_done or lead.finished):
            return False  # wait one prefill so this sample reuses sample 0's prompt blocks
        if seq.num_computed_tokens == 0 and not seq.block_ids and self.pool.enable_prefix_caching:
            tokens = seq.token_ids
            seq.block_hashes = block_hashes(tokens, self.pool.block_size, seq.block_hashes)
            usable = (seq.num_tokens - 1) // self.pool.block_size  # always compute at least one token
            if seq.params.prompt_logprobs is not None and seq.lead is None:
                usable = 0  # prompt logprobs: every prompt position is computed
            seq.block_ids = self.pool.lookup_prefix(seq.block_hashes[:usable])
            seq.num_computed_tokens = len(seq.block_ids) * self.pool.block_size
            seq.num_committed_blocks = len(seq.block_ids)
            seq.num_cached_tokens = max(seq.num_cached_tokens, seq.num_computed_tokens)
        count = seq.num_remaining
        if count > budget and not self.enable_chunked_prefill:
            return self._undo_admit(seq)
        if not self._grow(seq, seq.num_computed_tokens + min(count, budget)):
            return self._undo_admit(seq)
        return True

    def _undo_admit(self, seq: Sample) -> bool:
        self._release(seq)
        return False

    def _grow(self, seq: Sample, num_tokens: int) -> bool:
        needed = -(-num_tokens // self.pool.block_size) - len(seq.block_ids)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate(needed))
        return True

    def _preempt(self, seq: Sample) -> None:
        self.running.remove(seq)
        seq.spec_token_ids = []
        self._release(seq)
        seq.status = SampleStatus.WAITING
        self.waiting.appendleft(seq)
        self.waiting = deque(sorted(self.waiting, key=lambda s: s.arrival))
        self.num_preemptions += 1

    def _release(self, seq: Sample) -> None:
        if self.split is not None and self.split.seq is seq:
            self.split = None  # its computed layers are dropped with its blocks; the runner drops their state
        if seq.block_ids:
            self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.block_table_version += 1
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    def _commit_full_blocks(self, seq: Sample) -> None:
        """Publish blocks whose every token is computed and known; each block is hashed once, from its own tokens."""
        size = self.pool.block_size
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // size  # an in-flight token is not known yet
        hashes = seq.block_hashes
        for i in range(seq.num_committed_blocks, full):
            if i == len(hashes):
                hashes.append(chain_hash(hashes[-1] if hashes else None, seq.token_slice(i * size, (i + 1) * size)))
            self.pool.commit(seq.block_ids[i], hashes[i])
        seq.num_committed_blocks = max(seq.num_committed_blocks, full)
