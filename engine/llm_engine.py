"""LLMEngine: add_request / step / abort over the scheduler, model runner, sampler and detokenizer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass


from engine.config import EngineConfig
from engine.cpu_threads import ThreadAdapter
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import GrammarError, InvalidRequestError, ParallelGroupError
from engine.kv_cache import BlockPool
from engine.loader.model_info import ModelInfo
from engine.executor import Executor
from engine.model_runner import StepResult
from engine.models.base import CausalLM
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.logit_bias import check_logit_bias
from engine.prompt_logprobs import PromptRows, entries, rows_to_score
from engine.prompt_rules import check_prompt_ids, completion_budget
from engine.reports import EngineStats
from engine.request import Request, Sample, SampleProgress
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.step_budget import StepBudget, StepWork
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.decoder import SpecDecoder
from engine.step_messages import PromptRowSpan, PromptScores, StepMessages
from engine.spec_decode.verify import accepted_tokens
from engine.structured import GrammarCompiler, unconstrained_bitmask
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass
class InFlight:
    """A launched batch whose sampled ids are still on the device: `samples[i]` drew row i of `result`
    (with speculative decoding `drafts[i]` were verified too, each on a row of its own after sample i's)."""

    samples: list[Sample]
    result: StepResult
    drafts: list[list[int]] | None = None


@dataclass(frozen=True)
class EngineLayout:
    """The sizes and modes the builder (engine/builder.py) resolved for this engine."""

    num_blocks: int  # the KV pool
    max_model_len: int  # the context served (fitted to the pool)
    max_num_seqs: int
    async_scheduling: bool


class LLMEngine:
    """Synchronous core: one `step()` = one scheduled batch = one forward pass. engine/builder.py makes it."""

    def __init__(self, executor: Executor, tokenizer: Tokenizer, config: EngineConfig, layout: EngineLayout,
                 model_info: ModelInfo | None = None) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        self.model_info = model_info
        self.max_model_len = layout.max_model_len
        self.async_scheduling = layout.async_scheduling
        self.pool = BlockPool(layout.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, layout.max_num_seqs, config.batched_tokens,
                                   config.enable_chunked_prefill)
        self.step_budget: StepBudget | None = None  # measured by the builder (CPU, no explicit token budget)
        self.outputs = OutputProcessor(tokenizer)
        spec_config = config.speculative_config  # parsed by EngineConfig
        self.spec = (SpecDecoder(spec_config, self.max_model_len)
                     if isinstance(spec_config, SpeculativeConfig) else None)
        self._in_flight: InFlight | None = None
        self.messages = StepMessages()  # what the runner has been told of each sequence
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.load_seconds = 0.0  # set by the builder: opening, building and placing the weights
        self._grammars: GrammarCompiler | None = None
        self.thread_adapter: ThreadAdapter | None = None  # set by the builder: torch's threads follow the load

    @property
    def model(self) -> CausalLM:
        """The model this process runs (tensor parallel: rank 0's slice)."""
        return self.executor.runner.model

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiled-grammar cache, built on first use (servers that never constrain output never import xgrammar)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_engine(self.tokenizer, self.executor.vocab_size, self.config)
        return self._grammars

    # --- requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Queue a request; raises InvalidRequestError for a duplicate id or a prompt that cannot fit."""
        request = self.prepare_request(request_id, prompt, params)
        self.add_prepared(request)
        return request.prompt_token_ids

    def prepare_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Request:
        """Validate and tokenize a request without touching the running state (callable from another thread)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", "request_id")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_ids(ids, self.executor.vocab_size)
        check_logit_bias(params.logit_bias, self.executor.vocab_size)
        max_tokens = completion_budget(len(ids), params.max_tokens, self.max_model_len)
        if self.config.max_output_tokens is not None:
            max_tokens = min(max_tokens, self.config.max_output_tokens)
        if not self.config.enable_chunked_prefill and len(ids) + max_tokens > self.config.batched_tokens:
            raise InvalidRequestError(f"with chunked prefill off a sequence may not exceed max_num_batched_tokens "
                                      f"({self.config.batched_tokens})", "max_tokens")
        grammars = []
        if params.structured is not None:
            try:  # a cache hit when the server compiled it beforehand (off the step loop)
                grammars = [self.grammars.matcher(params.structured) for _ in range(params.n)]
            except GrammarError as exc:
                raise InvalidRequestError(f"the output schema cannot be compiled: {exc}", "response_format") from exc
        stop_token_ids = params.ending_token_ids(self.tokenizer.eos_token_ids)
        seqs: list[Sample] = []
        detoks: list[IncrementalDetokenizer] = []
        for index in range(params.n):
            seed = None if params.seed is None else (params.seed + index) % 2**64  # n > 1: seed, seed+1, ...
            seqs.append(Sample(request_id, index, ids, params, max_tokens, seed, lead=seqs[0] if seqs else None,
                               grammar=grammars[index] if grammars else None, stop_token_ids=stop_token_ids))
            if self.outputs.detokenize:
                detoks.append(IncrementalDetokenizer.for_sample(self.tokenizer, ids, params, stop_token_ids))
        return Request(request_id, ids, params, seqs, detoks, [SampleProgress() for _ in seqs],
                       [None] if params.prompt_logprobs is not None else None)

    def add_prepared(self, request: Request) -> None:
        """Queue a request made by `prepare_request`."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", "request_id")
        self.requests[request.request_id] = request
        for seq in request.samples:
            self.scheduler.add(seq)
        self.prompt_tokens_total += len(request.prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Remove a request wherever it is; its blocks are free on return."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        return self._fail(request, None)

    def finish_sample(self, request_id: str, index: int, stop: str) -> RequestOutput | None:
        """End a sample on a stop string found outside the engine (its text is made in an API process), as one
        found here would: it leaves the scheduler and what it computed past the stop is dropped. The request's
        last output once every sample has finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        seq = request.samples[index]
        if seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", stop
            self._retire(seq)
        if not request.finished:
            return None
        del self.requests[request_id]
        return self.outputs.output(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # --- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a batch, then turn a finished batch's tokens into delta outputs.

        Synchronous scheduling finishes the batch it launched. Async scheduling (vLLM v1's) first
        launches the next batch, counting each sampling sequence's pending token as already there
        (its input id is read from the device), and only then reads back and processes the previous
        batch, so on a GPU the host work of one step runs while the device computes the next.
        """
        self.steps_total += 1
        if self.thread_adapter is not None:
            self.thread_adapter.maybe_adjust()
        previous, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        if self.spec is not None:
            self.spec.propose(self.scheduler.running)
        batch = self.scheduler.schedule()
        for seq in batch.preempted:  # its blocks are gone: the runner frees its table row until it runs again
            self.messages.preempted(seq)
        timed = self.step_budget is not None or (self.spec is not None and self.spec.step_cost is not None)
        timing = (StepWork.of(batch.items, batch.layer_share), time.perf_counter()) if timed and batch else None
        launched = self._launch(batch, outputs) if batch else None
        if self.async_scheduling:
            self._in_flight, launched = launched, previous
        if launched is not None:
            outputs.extend(self._complete(launched))
        if timing is not None:
            work, started = timing
            seconds = time.perf_counter() - started
            if self.step_budget is not None:
                self.step_budget.observe(work, seconds)
            if self.spec is not None and not work.prompt_chunks:  # every item a decode: 1 + its drafts rows
                self.spec.observe_step(work.decode_rows, work.decode_pairs, work.decode_rows > len(batch.items), seconds)
        return outputs

    def _launch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> InFlight | None:
        """Forward and sample `batch` (the device result is not waited for); a failure fails its requests."""
        sample_rows = [i for i, (seq, count) in enumerate(batch.items)  # prompt done (drafts too): sample
                       if seq.num_computed_tokens + count == len(seq.prompt_token_ids) + len(seq.output_token_ids)
                       + seq.num_in_flight + len(seq.spec_token_ids)]  # Sample.num_tokens, inlined: runs per sequence
        if batch.chunk_pending and sample_rows and sample_rows[-1] == len(batch.items) - 1:
            sample_rows.pop()  # a split chunk with layers left to run: its last row has no logits yet
        samples = [batch.items[i][0] for i in sample_rows]
        drafts = [seq.spec_token_ids for seq in samples] if self.spec is not None else []
        speculating = any(drafts)
        try:
            prompt_rows = self._prompt_rows(batch)
            step = self.messages.build(batch.items, sample_rows,
                                       {seq.seq_id: seq.spec_token_ids for seq in samples if seq.spec_token_ids}
                                       if speculating else {},
                                       [PromptRowSpan(rows.item, rows.first, rows.count) for rows in prompt_rows],
                                       {seq.seq_id: len(seq.output_token_ids) + seq.num_in_flight for seq in samples
                                        if seq.params.min_tokens}, self._grammar_bitmask(samples, drafts), batch.layer_span)
            result = self.executor.execute(step)
            if prompt_rows:
                self._score_prompts(batch, prompt_rows, result.prompt_logprobs())
        except ParallelGroupError:  # a rank is gone: no later step can run either (AsyncEngine stops)
            raise
        except Exception as exc:  # a failing model fails this step's requests, not the engine
            log.exception("engine step failed")
            failed = {seq.request_id for seq, _ in batch.items}
            outputs.extend(self._fail(self.requests.pop(rid), f"{type(exc).__name__}: {exc}") for rid in failed
                           if rid in self.requests)
            return None
        self.scheduler.after_step(batch)
        for seq in samples:
            seq.num_in_flight += 1
        if speculating:
            for seq, _ in batch.items:
                seq.spec_token_ids = []
            return InFlight(samples, result, drafts)
        return InFlight(samples, result)

    def _prompt_rows(self, batch: ScheduledBatch) -> list[PromptRows]:
        """The prompt positions this batch computes for requests that asked for prompt logprobs."""
        found = []
        for item, (seq, count) in enumerate(batch.items):
            if seq.params.prompt_logprobs is None or seq.lead is not None:
                continue
            request = self.requests.get(seq.request_id)
            if request is None or request.prompt_logprobs is None:
                continue
            rows = rows_to_score(item, seq.prompt_token_ids, seq.num_computed_tokens, count,
                                 len(request.prompt_logprobs))
            if rows is not None:
                found.append(rows)
        return found

    def _score_prompts(self, batch: ScheduledBatch, prompt_rows: list[PromptRows], scores: list[PromptScores]) -> None:
        """The runner's scores of the step's prompt rows, as logprob entries of their requests."""
        for rows, scored in zip(prompt_rows, scores):
            seq = batch.items[rows.item][0]
            scored_so_far = self.requests[seq.request_id].prompt_logprobs
            if scored_so_far is not None:  # always: _prompt_rows takes only requests that asked
                scored_so_far.extend(entries(scored, rows.targets, self.tokenizer.token_bytes))

    def _complete(self, launched: InFlight) -> list[RequestOutput]:
        """Append the batch's tokens (the step's one wait on the device), apply the token rules, emit deltas."""
        if launched.drafts is not None:
            return self._complete_verified(launched, launched.drafts)
        result = launched.result.output()
        token_ids = result.token_ids
        samples, rows = [], []
        for row, (seq, token) in enumerate(zip(launched.samples, token_ids)):
            seq.num_in_flight -= 1
            if seq.finished:  # ended (a stop, an abort) after this batch was launched: its token is dropped
                continue
            self._append_token(seq, token)
            samples.append(seq)
            rows.append(row)
        touched, stopped = self.outputs.add_tokens(self.requests, samples, rows, result)
        for seq in stopped:
            self._retire(seq)
        return self._emit(touched)

    def _complete_verified(self, launched: InFlight, drafts: list[list[int]]) -> list[RequestOutput]:
        """Speculative decoding: each sample emits its accepted drafts and one drawn token, one at a time through
        the token rules (a stop drops what follows it), then forgets the rejected drafts' KV."""
        result = launched.result.output()
        token_ids = result.token_ids
        touched: dict[str, Request] = {}
        row = 0
        for seq, draft in zip(launched.samples, drafts):
            first, row = row, row + 1 + len(draft)
            seq.num_in_flight -= 1
            if seq.finished:
                continue
            emitted = accepted_tokens(draft, token_ids[first:row])
            if draft and self.spec is not None:  # drafts come only from the spec decoder
                self.spec.observe(seq, len(draft), len(emitted) - 1)
            for j, token in enumerate(emitted):
                self._append_token(seq, token)
                changed, stopped = self.outputs.add_tokens(self.requests, [seq], [first + j], result)
                touched.update((r.request_id, r) for r in changed)
                for stopped_seq in stopped:
                    self._retire(stopped_seq)
                if seq.finish_reason is not None:
                    break
            if draft and not seq.finished:
                self.scheduler.rollback(seq)
        return self._emit(list(touched.values()))

    def _emit(self, touched: list[Request]) -> list[RequestOutput]:
        outputs = [self.outputs.output(r) for r in touched]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def _append_token(self, seq: Sample, token: int) -> None:
        """The rules that need no text: stop and EOS tokens, the grammar, max_tokens and the context length."""
        seq.output_token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.stopped_by_token():
            seq.finish_reason, seq.stop_reason = "stop", (token if token in seq.params.stop_token_ids else None)
        elif seq.grammar is not None and (not seq.grammar.accept(token) or seq.grammar.terminated):
            seq.finish_reason = "stop"
        elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_known_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        else:
            return
        self._retire(seq)

    def _grammar_bitmask(self, samples: list[Sample], drafts: list[list[int]]) -> bytes | None:
        """The allowed-token bitmask of this step's sampler rows, for the step message: a sample's row, then one per
        draft it verifies (`drafts`, empty without speculative decoding); None when no row is constrained (they pay
        nothing)."""
        if not any(seq.grammar is not None for seq in samples):
            return None
        drafts = drafts or [[] for _ in samples]
        bitmask = unconstrained_bitmask(len(samples) + sum(len(draft) for draft in drafts), self.executor.vocab_size)
        row = 0
        for seq, draft in zip(samples, drafts):
            if seq.grammar is not None:
                seq.grammar.fill_bitmasks(bitmask, row, draft)
            row += 1 + len(draft)
        return bitmask.numpy().tobytes()

    def _retire(self, seq: Sample) -> None:
        """A finished or aborted sample leaves the scheduler (its blocks are freed), the sampler and the runner."""
        if not seq.finished:
            self.scheduler.remove(seq)
        self.messages.forget(seq)
        if self.spec is not None:
            self.spec.release(seq)

    def _fail(self, request: Request, error: str | None) -> RequestOutput:
        for seq in request.samples:
            self._retire(seq)
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.stop_reason = error
        return self.outputs.output(request)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len({s.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request_id for s in self.scheduler.waiting}),
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.num_used,
            kv_blocks_free=self.pool.num_free,
            kv_cache_tokens=self.pool.num_blocks * self.config.block_size,
            kv_cache_bytes=self.executor.kv_cache_bytes(),
            prefix_cache_hit_rate=self.pool.hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            steps_total=self.steps_total,
            model_load_seconds=self.load_seconds,
            tensor_parallel_size=self.executor.world_size,
            step_prefill_budget=self.step_budget.last_prefill_tokens if self.step_budget is not None else None,
            kernels=self.executor.kernels(),
            spec_decode=self.spec.stats.snapshot() if self.spec is not None else None,
        )

    def close(self) -> None:
        if self._grammars is not None:
            self._grammars.close()
        self.executor.shutdown()


