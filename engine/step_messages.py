"""The scheduler's decision for one step, as the model runner receives it (vLLM v1's `SchedulerOutput` shape).

A sequence the runner has not seen arrives once as a `NewSequence` (its known token ids, block ids,
computed count and sampling params); from then on it is a row of `CachedSequences`: the block ids it
gained (from `block_ids_from`: a rollback or a re-grown table replaces the tail) and its computed count.
No token ids: the runner appends the ids it samples itself (with drafts, the accepted ones and the drawn
one after them, as the engine does), as vLLM v1's runner does. The runner keeps its own per-sequence
state from these messages (engine/model_runner.py) and never reads the engine's `Sample`. Finished sequences are named in `freed_seq_ids` (the runner forgets them),
preempted ones in `preempted_seq_ids` (the runner gives their block-table row back but keeps their
tokens and sampling state: a seeded generator or penalty counts go on where they were, and drops the hidden
state of a prompt chunk split across steps, `layer_span`, which starts over when the sequence returns). The runner
samples each step and answers with a `RunnerOutput`. `StepMessages` is the engine's side: what the
runner has been told.

Plain msgspec structs (array-like, no GC tracking), so a step crosses a process boundary cheaply
(tests/test_step_messages.py measures it).
"""

from __future__ import annotations

import msgspec

from engine.request import Sample
from engine.sampling_params import SamplingParams


class NewSequence(msgspec.Struct, array_like=True, gc=False):
    seq_id: int
    token_ids: list[int]  # the prompt and any output tokens already known (a preempted sequence resuming)
    prompt_len: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams
    seed: int | None  # this sample's own seed (the request's seed + its index), None: the sampler's stream
    stop_token_ids: list[int]  # ids banned while fewer than min_tokens are out (EOS unless ignored, stop ids)


class CachedSequences(msgspec.Struct, array_like=True, gc=False):
    """Parallel lists, one entry per scheduled sequence the runner already holds."""

    seq_ids: list[int] = []
    block_ids_from: list[int] = []  # the runner's block list is cut here, then `new_block_ids` appended
    new_block_ids: list[list[int]] = []
    num_computed_tokens: list[int] = []


class PromptRowSpan(msgspec.Struct, array_like=True, gc=False):
    """Logit rows a scheduled item adds for prompt logprobs: `count` positions from `first` within item `item`."""

    item: int
    first: int
    count: int


class SchedulerOutput(msgspec.Struct, array_like=True, gc=False):
    new_seqs: list[NewSequence]
    cached_seqs: CachedSequences
    scheduled_seq_ids: list[int]  # the batch, in order
    num_scheduled_tokens: list[int]  # tokens each computes this step
    sample_items: list[int]  # the batch items whose last position (and drafts) are sampled
    spec_token_ids: dict[int, list[int]] = {}  # drafts verified this step, by sequence
    prompt_rows: list[PromptRowSpan] = []  # prompt logprob rows, after the sampled ones
    freed_seq_ids: list[int] = []  # finished since the last step: the runner forgets them
    preempted_seq_ids: list[int] = []  # their blocks are gone: the runner frees their table rows until they return
    num_generated: dict[int, int] = {}  # sampled sequences with min_tokens: tokens out so far (in flight too)
    grammar_bitmask: bytes | None = None  # int32 [sampler rows, ceil(vocab / 32)], xgrammar's layout; None: free
    # A prompt chunk split across steps: the batch's last sequence runs only layers [start, end) this step, and its
    # tokens count as computed once the last layer ran (the runner keeps its hidden state until the next step).
    layer_span: tuple[int, int] | None = None


class PromptScores(msgspec.Struct, array_like=True, gc=False):
    """One prompt row span's scores: each position's target logprob and rank, and its `top` best (id, logprob)."""

    logprobs: list[float]
    ranks: list[int]
    top: list[list[tuple[int, float]]]


class RunnerOutput(msgspec.Struct, array_like=True, gc=False):
    """The runner's answer to a step, by sampler row: each sampled item's row, then (when it verified drafts) one
    row per draft position. `logprobs` / `top_logprobs` hold a value for rows whose request asked."""

    seq_ids: list[int]  # the sampled sequences, in row order (drafts' rows follow their sequence's)
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]
    prompt_logprobs: list[PromptScores] = []  # one per prompt row span of the step


class StepMessages:
    """Turns the scheduler's batches into SchedulerOutputs, remembering what the runner was told of each sequence
    (its blocks and the block-table version they came from)."""

    def __init__(self) -> None:
        self._told: dict[Sample, list[int]] = {}  # seq -> [blocks sent, block-table version]
        self._freed: list[int] = []
        self._preempted: list[int] = []

    def forget(self, seq: Sample) -> None:
        """`seq` finished: the next message frees its runner state."""
        if self._told.pop(seq, None) is not None:
            self._freed.append(seq.seq_id)

    def preempted(self, seq: Sample) -> None:
        """`seq` lost its blocks: the next message says so (its table comes whole when it runs again)."""
        if seq in self._told:
            self._preempted.append(seq.seq_id)

    def build(self, items: list[tuple[Sample, int]], sample_items: list[int], spec_token_ids: dict[int, list[int]],
              prompt_rows: list[PromptRowSpan], num_generated: dict[int, int],
              grammar_bitmask: bytes | None, layer_span: tuple[int, int] | None = None) -> SchedulerOutput:
        new: list[NewSequence] = []
        ids: list[int] = []
        firsts: list[int] = []
        blocks: list[list[int]] = []
        computed: list[int] = []
        scheduled: list[int] = []
        counts: list[int] = []
        told, none = self._told, _NONE
        for seq, count in items:  # runs for every scheduled sequence every step: kept to plain list work, one pass
            seq_id = seq.seq_id
            scheduled.append(seq_id)
            counts.append(count)
            entry = told.get(seq)
            block_ids = seq.block_ids
            if entry is None:
                new.append(NewSequence(seq_id, seq.prompt_token_ids + seq.output_token_ids,
                                       len(seq.prompt_token_ids), list(block_ids), seq.num_computed_tokens,
                                       seq.params, seq.seed, sorted(seq.stop_token_ids)))
                told[seq] = [len(block_ids), seq.block_table_version]
                continue
            ids.append(seq_id)
            sent_blocks, version = entry
            num_blocks = len(block_ids)
            if version != seq.block_table_version:  # blocks were given back since: the whole table again
                sent_blocks = 0
                entry[1] = seq.block_table_version
            firsts.append(sent_blocks)
            if num_blocks != sent_blocks:
                blocks.append(block_ids[sent_blocks:])
                entry[0] = num_blocks
            else:
                blocks.append(none)
            computed.append(seq.num_computed_tokens)
        freed, self._freed = self._freed, []
        preempted, self._preempted = self._preempted, []
        return SchedulerOutput(new, CachedSequences(ids, firsts, blocks, computed), scheduled, counts,
                               sample_items, spec_token_ids, prompt_rows, freed, preempted, num_generated,
                               grammar_bitmask, layer_span)


_NONE: list[int] = []  # shared by every entry with nothing new (read only: the runner extends its own lists by it)
