"""Step messages -> step inputs in persistent buffers -> model forward (eager or a replayed CUDA graph) -> sampled ids.

Owns the paged KV caches and the input buffers. Buffers are allocated once (pinned on the host
on CUDA) and filled in place each step with numpy; a sequence's block-table row lives in the
runner and only grows by the blocks it gained, so no step rebuilds tables from Python lists.
Decode-only batches can be padded to a bucket size (`pad_decodes`): padded rows read and write a
scratch KV block no sequence owns, which is what lets `CudaGraphs` replay one captured graph
per bucket.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from engine.attention_metadata import AttentionMetadata
from engine.host_device import upload
from engine.models.base import CausalLM
from engine.models.decoder import LayerSpan
from engine.prompt_logprobs import score
from engine.sampler import SampleResult, Sampler, SamplingRow, skip_seeded_draws
from engine.spec_decode.verify import accepted_tokens
from engine.step_messages import NewSequence, PromptScores, RunnerOutput, SchedulerOutput

log = logging.getLogger(__name__)

GIB = 1 << 30


def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
    element = torch.empty((), dtype=model.kv_cache_dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


def num_kv_blocks(model: CausalLM, block_size: int, kv_cache_gib: float, gpu_memory_utilization: float) -> int:
    """Blocks that fit the budget: `kv_cache_gib` on CPU, the unreserved share of free GPU memory on CUDA.

    One block is kept back as the scratch block that padded decode rows write to.
    """
    if model.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model.device)
        budget = free - (1.0 - gpu_memory_utilization) * total
    else:
        budget = kv_cache_gib * GIB
    return int(budget // kv_bytes_per_block(model, block_size)) - 1


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes (vLLM's): 1, 2, 4, 8, then every multiple of 8 up to `max_num_seqs`."""
    sizes = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    return sorted({min(size, max_num_seqs) for size in sizes})


@dataclass
class StepInputs:
    """Everything one forward reads, already on the device: what a tensor-parallel leader broadcasts.

    `num_rows` sequences (padded ones included) bring `input_ids.shape[0]` tokens; the logits of
    the first `num_sampled` rows of the model's output are the step's real ones.
    """

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    metadata: AttentionMetadata
    num_sampled: int
    decode_bucket: int | None = None  # set when the batch is decode-only and padded to this size
    span: LayerSpan | None = None  # the layers the batch's last sequence, a split prompt chunk, runs this step
    span_seq_id: int = -1  # ... that sequence, whose state after them the runner keeps


class SequenceState:
    """What the runner knows of one sequence, built only from step messages (engine/step_messages.py)."""

    __slots__ = ("token_ids", "block_ids", "num_computed_tokens", "row", "sampling_row", "stop_token_ids",
                 "saved_generator", "chunk_state")

    def __init__(self, new: NewSequence, row: int, device: torch.device) -> None:
        self.token_ids = list(new.token_ids)  # known ones and those sampled since (a step's once it is read back)
        self.block_ids = list(new.block_ids)
        self.num_computed_tokens = new.num_computed_tokens
        self.row = row  # its row of BlockTableRows; -1 while preempted
        generator = None if new.seed is None else torch.Generator(device=device).manual_seed(new.seed)
        self.sampling_row = SamplingRow(new.sampling_params, generator, (), new.seq_id, self.token_ids[:new.prompt_len])
        self.stop_token_ids = tuple(new.stop_token_ids)
        # A seeded row verifying drafts: its generator's state before the draws, and the vocabulary (to rewind it).
        self.saved_generator: tuple[torch.Tensor, int] | None = None
        # A prompt chunk split across steps: its (hidden, residual) after the layers it has run so far.
        self.chunk_state: tuple[torch.Tensor, torch.Tensor] | None = None


class StepResult:
    """A step's answer while its sampled ids may still be on the device: `output()` is the step's one wait on it,
    after which the runner's sequences hold their new ids (`learn`)."""

    def __init__(self, seq_ids: list[int], sampled: SampleResult | None, prompt_scores: list[PromptScores],
                 learn: Callable[[RunnerOutput], None]) -> None:
        self._seq_ids = seq_ids
        self._sampled = sampled
        self._prompt_scores = prompt_scores
        self._learn = learn
        self._output: RunnerOutput | None = None

    def prompt_logprobs(self) -> list[PromptScores]:
        """The step's prompt rows' scores (already on the host)."""
        return self._prompt_scores

    def output(self) -> RunnerOutput:
        if self._output is None:
            sampled = self._sampled
            self._output = RunnerOutput(self._seq_ids, sampled.token_ids, sampled.logprobs, sampled.top_logprobs,
                                        self._prompt_scores) if sampled is not None else \
                RunnerOutput(self._seq_ids, [], [], [], self._prompt_scores)
            self._learn(self._output)
        return self._output


class InputBuffers:
    """Host staging (pinned on CUDA) and device tensors of fixed size, reused by every step."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device) -> None:
        pin = device.type == "cuda"

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            return host, host.numpy(), torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = pair((max_tokens,), torch.int64)
        self.positions = pair((max_tokens,), torch.int64)
        self.slot_mapping = pair((max_tokens,), torch.int64)
        self.seq_lens = pair((max_seqs,), torch.int32)
        self.query_start_loc = pair((max_seqs + 1,), torch.int32)
        self.logits_indices = pair((max_tokens,), torch.int64)  # speculative decoding: several per sequence
        # Device only: each step gathers its rows from BlockTableRows' device table (CUDA graphs read this buffer).
        self.block_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        self.table_rows = pair((max_seqs,), torch.int64)  # each batch row's row of BlockTableRows
        self._uploaded: torch.cuda.Event | None = None

    def reusable(self) -> None:
        """Wait until the previous step's copies have left the host staging (async scheduling writes it
        again while the device may not have run them yet); a no-op on CPU and usually already true."""
        if self._uploaded is not None:
            self._uploaded.synchronize()

    def uploads_queued(self) -> None:
        """Mark the end of this step's uploads on the stream (CUDA)."""
        if self.input_ids[2].device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    @staticmethod
    def upload(buffer: tuple[torch.Tensor, np.ndarray, torch.Tensor], *extent: int) -> torch.Tensor:
        """Copy the first `extent` of a buffer to the device (non-blocking from pinned memory); the device view."""
        host, _, device = buffer
        index = tuple(slice(0, n) for n in extent)
        device[index].copy_(host[index], non_blocking=True)
        return device[index]


class BlockTableRows:
    """Each sequence's block ids in a fixed row of a host table and of its device twin, written as they arrive.

    A step uploads only the entries written since the previous one (on CPU the twin shares the host
    table's memory), and the batch's block table is gathered from the twin on the device, so no
    step copies whole rows from the host: the host work does not grow with the sequences' length.
    The last row is all scratch block, for padded batch rows.
    """

    def __init__(self, max_rows: int, max_blocks: int, scratch_block: int, device: torch.device) -> None:
        self.table = np.zeros((max_rows + 1, max_blocks), dtype=np.int32)
        self.padding_row = max_rows
        self.table[self.padding_row] = scratch_block
        host = torch.from_numpy(self.table)
        self.device_table = host if device.type == "cpu" else host.to(device)
        self._written: list[tuple[int, int, int]] = []  # (row, first column, end column) not uploaded yet
        self.free = list(range(max_rows - 1, -1, -1))

    def take(self) -> int:
        return self.free.pop()

    def give_back(self, row: int) -> None:
        self.free.append(row)

    def write(self, row: int, first: int, blocks: list[int]) -> None:
        """Blocks `first..` of `row` are `blocks` now (entries past them are stale and never read)."""
        if blocks:
            self.table[row, first:first + len(blocks)] = blocks
            self._written.append((row, first, first + len(blocks)))

    def upload_written(self) -> None:
        """Copy the entries written since the last call to the device twin (one small scatter)."""
        written, self._written = self._written, []
        if not written or self.device_table.device.type == "cpu":
            return
        rows = np.concatenate([np.full(end - begin, row) for row, begin, end in written])
        columns = np.concatenate([np.arange(begin, end) for _, begin, end in written])
        device = self.device_table.device
        self.device_table[upload(rows.tolist(), torch.long, device), upload(columns.tolist(), torch.long, device)] = \
            upload(self.table[rows, columns].tolist(), torch.int32, device)


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, pad_decodes: bool = False, seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.device
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks  # one block past the pool: padded rows write here
        shape = (num_blocks + 1, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.kv_cache_dtype, device=self.device),
             torch.zeros(shape, dtype=model.kv_cache_dtype, device=self.device))
            for _ in range(model.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)
        self.max_num_seqs = max_num_seqs
        self.max_blocks = -(-max_model_len // block_size)
        self.buffers = InputBuffers(max(max_num_batched_tokens, max_num_seqs), max_num_seqs, self.max_blocks,
                                    self.device)
        self.rows = BlockTableRows(2 * max_num_seqs, self.max_blocks, self.scratch_block, self.device)
        self.buckets = decode_buckets(max_num_seqs) if pad_decodes else []
        self.graphs: CudaGraphs | None = None
        self.seqs: dict[int, SequenceState] = {}  # by seq_id, from the step messages
        self.sampler = Sampler(seed)
        # The previous step's sampled sequences and their ids still on the device (async scheduling's inputs).
        self._last_sampled: list[int] = []
        self._last_token_ids: torch.Tensor | None = None

    def update(self, step: SchedulerOutput) -> None:
        """Bring the per-sequence state up to the step's message: forget the freed, add the new, extend the cached."""
        seqs, rows = self.seqs, self.rows
        for seq_id in step.preempted_seq_ids:
            state = seqs[seq_id]
            if state.row >= 0:
                rows.give_back(state.row)
            state.row, state.block_ids, state.chunk_state = -1, [], None
        for seq_id in step.freed_seq_ids:
            freed = seqs.pop(seq_id, None)
            if freed is not None:
                if freed.row >= 0:
                    rows.give_back(freed.row)
                self.sampler.release(seq_id)
        for new in step.new_seqs:
            state = seqs[new.seq_id] = SequenceState(new, rows.take(), self.device)
            rows.write(state.row, 0, state.block_ids)
        cached = step.cached_seqs
        for seq_id, first, blocks, computed in zip(cached.seq_ids, cached.block_ids_from, cached.new_block_ids,
                                                   cached.num_computed_tokens):
            state = seqs[seq_id]
            if state.row < 0:  # back from preemption
                state.row = rows.take()
            if blocks or first != len(state.block_ids):
                del state.block_ids[first:]
                state.block_ids.extend(blocks)
                rows.write(state.row, first, blocks)
            state.num_computed_tokens = computed

    def prepare(self, step: SchedulerOutput) -> StepInputs:
        """Apply the step's message (`update`), then fill the buffers for its scheduled sequences; logits for its
        `sample_items` (each sampled item's drafts' positions too, when the step verifies drafts), then for
        its prompt rows (prompt logprobs).

        A decode whose input token is still in flight (async scheduling) reads it on the device from the
        previous step's sampled ids.
        """
        self.update(step)
        seq_ids, sample_rows, prompt_rows, drafts = (step.scheduled_seq_ids, step.sample_items, step.prompt_rows,
                                                     step.spec_token_ids)
        logits_per_row = [1 + len(drafts.get(seq_ids[i], ())) for i in sample_rows] if drafts else None
        b, bs = self.buffers, self.block_size
        b.reusable()
        num_seqs = len(seq_ids)
        ids = b.input_ids[1]
        decode_ids, begin_list, row_list = [], [], []
        in_flight_at, in_flight_seqs = [], []
        seqs = self.seqs
        offset = width = 0
        for seq_id, count in zip(seq_ids, step.num_scheduled_tokens):  # one pass in Python: ids, starts, rows
            state = seqs[seq_id]
            begin = state.num_computed_tokens
            begin_list.append(begin)
            row_list.append(state.row)
            num_blocks = len(state.block_ids)
            if num_blocks > width:
                width = num_blocks
            known = state.token_ids
            if count == 1:
                if begin < len(known):
                    decode_ids.append(known[begin])
                else:  # sampled by the previous batch, not read back yet
                    decode_ids.append(0)
                    in_flight_at.append(offset)
                    in_flight_seqs.append(seq_id)
            else:
                if decode_ids:
                    ids[offset - len(decode_ids):offset] = decode_ids
                    decode_ids = []
                tokens = known[begin:begin + count]
                if len(tokens) < count:  # speculative decoding: the drafts follow the last known token
                    tokens += drafts[seq_id][:count - len(tokens)]
                ids[offset:offset + count] = tokens
            offset += count
        if decode_ids:
            ids[offset - len(decode_ids):offset] = decode_ids
        count_list = step.num_scheduled_tokens
        counts = np.array(count_list, dtype=np.int64)
        begins = np.array(begin_list, dtype=np.int64)
        rows = np.array(row_list, dtype=np.int64)
        num_tokens = offset
        starts = b.query_start_loc[1]
        starts[0] = 0
        np.cumsum(counts, out=starts[1:num_seqs + 1], dtype=np.int32)
        token_rows = np.repeat(rows, counts)
        positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(begins - starts[:num_seqs], counts)
        b.positions[1][:num_tokens] = positions
        table = self.rows.table
        b.slot_mapping[1][:num_tokens] = table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        b.seq_lens[1][:num_seqs] = begins + counts
        bucket = None if prompt_rows or step.layer_span is not None else self._bucket(count_list, sample_rows)
        rows_out, tokens_out = num_seqs, num_tokens
        if bucket is not None:  # decode-only, padded: extra rows attend to one token in the scratch block
            pad = slice(num_seqs, bucket)
            ids[pad] = 0
            b.positions[1][pad] = 0
            b.slot_mapping[1][pad] = self.scratch_block * bs
            b.seq_lens[1][pad] = 1
            starts[num_seqs + 1:bucket + 1] = np.arange(num_seqs + 1, bucket + 1)
            b.table_rows[1][pad] = self.rows.padding_row
            rows_out = tokens_out = bucket
            b.logits_indices[1][:bucket] = np.arange(bucket)
            num_logits = bucket
        elif logits_per_row is None:
            b.logits_indices[1][:len(sample_rows)] = starts[np.asarray(sample_rows, dtype=np.int64) + 1] - 1
            num_logits = len(sample_rows)
        else:  # each sampled item's last `logits_per_row[i]` tokens
            widths = np.asarray(logits_per_row, dtype=np.int64)
            num_logits = int(widths.sum())
            firsts = starts[np.asarray(sample_rows, dtype=np.int64) + 1] - widths
            within = np.arange(num_logits) - np.repeat(np.cumsum(widths) - widths, widths)
            b.logits_indices[1][:num_logits] = np.repeat(firsts, widths) + within
        num_sampled = len(sample_rows) if logits_per_row is None else num_logits
        for extra in prompt_rows or ():
            first = int(starts[extra.item]) + extra.first
            b.logits_indices[1][num_logits:num_logits + extra.count] = np.arange(first, first + extra.count)
            num_logits += extra.count
        b.table_rows[1][:num_seqs] = rows
        self.rows.upload_written()
        table_rows = b.upload(b.table_rows, rows_out)
        if bucket is not None:  # gathered into the static buffer a CUDA graph reads, at full width
            block_tables = torch.index_select(self.rows.device_table, 0, table_rows, out=b.block_tables[:bucket])
        else:
            block_tables = self.rows.device_table[:, :width].index_select(0, table_rows)
        num_decode = int((counts == 1).sum())
        metadata = AttentionMetadata(
            slot_mapping=b.upload(b.slot_mapping, tokens_out),
            block_tables=block_tables,
            seq_lens=b.upload(b.seq_lens, rows_out),
            query_start_loc=b.upload(b.query_start_loc, rows_out + 1),
            num_prefill_tokens=num_tokens - num_decode,
            num_decode_tokens=num_decode + (tokens_out - num_tokens),
            logits_indices=b.upload(b.logits_indices, num_logits),
        )
        input_ids = b.upload(b.input_ids, tokens_out)
        if in_flight_at:
            row_of = {seq_id: row for row, seq_id in enumerate(self._last_sampled)}
            last_token_ids = self._last_token_ids
            assert last_token_ids is not None, "a token in flight was sampled by the previous step"
            input_ids[upload(in_flight_at, torch.long, self.device)] = \
                last_token_ids[upload([row_of[seq_id] for seq_id in in_flight_seqs], torch.long, self.device)]
        inputs = StepInputs(input_ids, b.upload(b.positions, tokens_out), metadata, num_logits if prompt_rows
                            else num_sampled, bucket, self._span(step),
                            step.scheduled_seq_ids[-1] if step.layer_span is not None else -1)
        b.uploads_queued()
        return inputs

    def _span(self, step: SchedulerOutput) -> LayerSpan | None:
        """The step's part of a split prompt chunk (its last sequence), entering with the state its last step left."""
        if step.layer_span is None:
            return None
        start, end = step.layer_span
        state = self.seqs[step.scheduled_seq_ids[-1]]
        if start > 0 and state.chunk_state is None:
            raise RuntimeError(f"sequence {step.scheduled_seq_ids[-1]} continues a split chunk at layer {start} "
                               "without the state of its earlier layers")
        return LayerSpan(start, end, step.num_scheduled_tokens[-1], state.chunk_state if start > 0 else None)

    @torch.no_grad()  # not inference_mode: the sampler edits the logits in place
    def sample(self, step: SchedulerOutput, logits: torch.Tensor) -> StepResult:
        """Score the step's prompt rows (the tail of `logits`) and draw its sampled rows: each sampled item's row,
        then one row per draft it verifies (min_tokens bans counted per position, penalties counting the drafts before
        it); the ids stay on the device."""
        prompt_scores = []
        if step.prompt_rows:
            extra = sum(span.count for span in step.prompt_rows)
            logits, scored, start = logits[:logits.shape[0] - extra], logits[logits.shape[0] - extra:], 0
            for span in step.prompt_rows:
                state = self.seqs[step.scheduled_seq_ids[span.item]]
                first = state.num_computed_tokens + span.first + 1
                top = state.sampling_row.params.prompt_logprobs
                assert top is not None, "prompt rows are scheduled only for requests that ask"
                prompt_scores.append(score(scored[start:start + span.count], state.token_ids[first:first + span.count],
                                           top))
                start += span.count
        seq_ids, drafts, generated_of = step.scheduled_seq_ids, step.spec_token_ids, step.num_generated
        rows, sampled = [], []
        for item in step.sample_items:
            seq_id = seq_ids[item]
            state = self.seqs[seq_id]
            row = state.sampling_row
            generated = generated_of.get(seq_id) if generated_of else None  # None: no min_tokens rule
            row.banned_token_ids = state.stop_token_ids if generated is not None and generated < row.params.min_tokens \
                else ()
            rows.append(row)
            sampled.append(seq_id)
            draft = drafts.get(seq_id) if drafts else None
            if not draft:
                continue
            if row.generator is not None and not row.params.greedy:
                state.saved_generator = (row.generator.get_state(), logits.shape[-1])
            penalised = row.penalised
            for j in range(1, len(draft) + 1):
                banned = state.stop_token_ids if generated is not None and generated + j < row.params.min_tokens else ()
                rows.append(row if banned == row.banned_token_ids and not penalised else
                            dataclasses.replace(row, banned_token_ids=banned, drafts_before=draft[:j] if penalised else ()))
        bitmask = None
        if step.grammar_bitmask is not None:
            bitmask = torch.frombuffer(bytearray(step.grammar_bitmask), dtype=torch.int32).view(len(rows), -1)
            bitmask = bitmask.to(self.device)  # the sampler applies it on the logits' device
        result = self.sampler(logits, rows, token_bitmask=bitmask) if rows else None
        self._last_sampled, self._last_token_ids = sampled, result.device_token_ids if result is not None else None
        return StepResult(sampled, result, prompt_scores,
                          partial(self._append_sampled, drafts) if drafts else self._append_sampled_plain)

    def _append_sampled_plain(self, output: RunnerOutput) -> None:
        """Each sampled sequence's drawn id joins its tokens (as the engine appends it): the runner keeps its own
        ids and the step messages carry none. A sequence the engine finished meanwhile (its token dropped
        there) is already freed here or will be by the next message, which is all that reads it."""
        seqs = self.seqs
        for seq_id, token in zip(output.seq_ids, output.token_ids):
            state = seqs.get(seq_id)
            if state is not None:
                state.token_ids.append(token)

    def _append_sampled(self, drafts: dict[int, list[int]], output: RunnerOutput) -> None:
        """As `_append_sampled_plain`, for a step that verified drafts: a sequence's accepted drafts and the id drawn
        after them, the engine's own rule (engine/spec_decode/verify.py); a seeded row's generator is rewound to
        one draw per emitted token."""
        row, token_ids = 0, output.token_ids
        for seq_id in output.seq_ids:
            draft = drafts.get(seq_id, ())
            first, row = row, row + 1 + len(draft)
            state = self.seqs.get(seq_id)
            if state is None:
                continue
            emitted = accepted_tokens(draft, token_ids[first:row]) if draft else token_ids[first:row]
            state.token_ids.extend(emitted)
            if state.saved_generator is not None:
                self._rewind(state, len(emitted))

    @staticmethod
    def _rewind(state: SequenceState, num_emitted: int) -> None:
        """A seeded row drew once per verified position; leave its generator as if it had drawn once per emitted
        token (the sampler's exponential race takes one vocabulary-wide draw per row), so the next step's draw
        is the one non-speculative decoding would make and seeded outputs stay identical."""
        generator = state.sampling_row.generator
        assert state.saved_generator is not None and generator is not None, "saved only for seeded rows"
        generator_state, vocab_size = state.saved_generator
        generator.set_state(generator_state)
        skip_seeded_draws(generator, vocab_size, num_emitted)
        state.saved_generator = None

    def _bucket(self, counts: list[int], sample_rows: list[int]) -> int | None:
        """The padded size of a decode-only batch whose every row samples; None runs it as it is."""
        if not self.buckets or len(sample_rows) != len(counts) or any(count != 1 for count in counts):
            return None
        return next(size for size in self.buckets if size >= len(counts))

    @torch.no_grad()
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """This process's forward of prepared inputs (a captured graph's replay where one fits); the sampled rows'
        logits (float32), then any scored prompt rows'."""
        if inputs.span is not None:
            logits, chunk_state = self.model.forward_span(inputs.input_ids, inputs.positions, inputs.metadata,
                                                          inputs.span)
            self.seqs[inputs.span_seq_id].chunk_state = chunk_state
        elif self.graphs is not None and inputs.decode_bucket in self.graphs.logits:
            logits = self.graphs.replay(inputs.decode_bucket)
        else:
            logits = self.model.forward(inputs.input_ids, inputs.positions, inputs.metadata)
        return logits[:inputs.num_sampled] if logits.shape[0] != inputs.num_sampled else logits

    def best_forward_ms(self, num_seqs: int, tokens_per_seq: int, repeats: int) -> float:
        """The fastest of `repeats` timed forwards over the scratch block (after one warm-up run): start-up cost
        probes read it, and the best, not the mean, since a busy machine only slows a forward. CPU only: there
        the forward returns when it is done."""
        inputs = self.scratch_inputs(num_seqs, tokens_per_seq)
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats + 1):
                started = time.perf_counter()
                self.model.forward(inputs.input_ids, inputs.positions, inputs.metadata)
                best = min(best, (time.perf_counter() - started) * 1e3)
        return best

    def scratch_inputs(self, num_seqs: int, tokens_per_seq: int) -> StepInputs:
        """A batch whose every token reads and writes only the scratch block: for warm-up and graph capture."""
        b, bs = self.buffers, self.block_size
        num_tokens = num_seqs * tokens_per_seq
        b.input_ids[1][:num_tokens] = 0
        b.positions[1][:num_tokens] = np.tile(np.arange(tokens_per_seq), num_seqs)
        b.slot_mapping[1][:num_tokens] = self.scratch_block * bs
        b.seq_lens[1][:num_seqs] = tokens_per_seq
        b.query_start_loc[1][:num_seqs + 1] = np.arange(num_seqs + 1) * tokens_per_seq
        b.table_rows[1][:num_seqs] = self.rows.padding_row
        b.logits_indices[1][:num_seqs] = np.arange(1, num_seqs + 1) * tokens_per_seq - 1
        decode = tokens_per_seq == 1
        table_rows = b.upload(b.table_rows, num_seqs)
        metadata = AttentionMetadata(
            slot_mapping=b.upload(b.slot_mapping, num_tokens),
            block_tables=torch.index_select(self.rows.device_table, 0, table_rows, out=b.block_tables[:num_seqs]),
            seq_lens=b.upload(b.seq_lens, num_seqs),
            query_start_loc=b.upload(b.query_start_loc, num_seqs + 1),
            num_prefill_tokens=0 if decode else num_tokens, num_decode_tokens=num_tokens if decode else 0,
            logits_indices=b.upload(b.logits_indices, num_seqs),
        )
        return StepInputs(b.upload(b.input_ids, num_tokens), b.upload(b.positions, num_tokens), metadata, num_seqs,
                          num_seqs if decode else None)

    @torch.no_grad()
    def warm_up(self, forward: Callable[[StepInputs], torch.Tensor]) -> None:
        """CUDA: run (and so JIT-compile) the prefill and every decode bucket through `forward` before traffic."""
        started = time.perf_counter()
        longest = min(self.buffers.input_ids[0].shape[0], self.max_blocks * self.block_size)
        for num_seqs, tokens_per_seq in ((1, longest), (2, 16), *((size, 1) for size in decode_buckets(self.max_num_seqs))):
            forward(self.scratch_inputs(num_seqs, tokens_per_seq))
        torch.cuda.synchronize()
        log.info("warm-up compiled the prefill and %d decode batch sizes in %.1f s",
                 len(decode_buckets(self.max_num_seqs)), time.perf_counter() - started)

    def capture_graphs(self) -> None:
        """Capture one decode graph per padded batch size (after `warm_up`); later decode-only steps replay them."""
        self.graphs = CudaGraphs(self)
        self.graphs.capture()


class CudaGraphs:
    """One captured decode forward per padded batch size; replay reads the runner's device buffers."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def capture(self) -> None:
        """Largest bucket first, all graphs sharing one memory pool (the runner's warm-up compiled the kernels)."""
        model, pool = self.runner.model, None
        started = time.perf_counter()
        for bucket in reversed(self.runner.buckets):
            inputs = self.runner.scratch_inputs(bucket, 1)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = model.forward(inputs.input_ids, inputs.positions, inputs.metadata)
            pool = graph.pool()
            self.graphs[bucket], self.logits[bucket] = graph, logits
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.graphs),
                 self.runner.buckets[0], self.runner.buckets[-1], time.perf_counter() - started)

    def replay(self, bucket: int) -> torch.Tensor:
        self.graphs[bucket].replay()
        return self.logits[bucket]
