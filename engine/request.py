"""Engine-side state of one request (`Request`) and of each of its `n` samples (`Sample`)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import TokenLogprob
from engine.sampling_params import SamplingParams
from engine.structured.matcher import GrammarMatcher

_arrivals = itertools.count()
_seq_ids = itertools.count()


class SampleStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sample:
    """One of a request's `n` samples, as a token sequence: the scheduler's unit.

    vLLM v1 shape: `num_computed_tokens` of `num_tokens`; its blocks, prefix hashes and status live here.
    """

    request_id: str
    index: int  # which of the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int | None = None  # this sample's own seed (the request's seed + its index): the runner's generator
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    num_cached_tokens: int = 0
    status: SampleStatus = SampleStatus.WAITING
    arrival: int = field(default_factory=lambda: next(_arrivals))
    seq_id: int = field(default_factory=lambda: next(_seq_ids))  # how step messages name it to the runner
    lead: "Sample | None" = None  # sample 0 of the request, whose prompt blocks later samples reuse
    prompt_done: bool = False  # the prompt has been computed once (its full blocks are in the prefix cache)
    block_table_version: int = 0  # bumped whenever the blocks are given back, so copies of the table go stale
    grammar: GrammarMatcher | None = None  # constrained decoding: what this sample may generate next
    stop_token_ids: frozenset[int] = frozenset()  # ids that end it once min_tokens are out (EOS unless ignored)
    num_in_flight: int = 0  # async scheduling: tokens sampled on the device whose ids have not come back yet
    finish_reason: str | None = None  # "stop" | "length" | "abort" once it ended
    stop_reason: str | int | None = None  # the stop string or token id that ended it (an error message on abort)
    spec_token_ids: list[int] = field(default_factory=list)  # drafts this step verifies; not its tokens until accepted
    num_draft_tokens: int = 0  # speculative decoding: drafts verified for it so far
    num_accepted_tokens: int = 0  # ... and accepted

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int | None:
        """`token_ids[index]` without building the list; None for a token still in flight (async scheduling)."""
        prompt = self.prompt_token_ids
        if index < len(prompt):
            return prompt[index]
        index -= len(prompt)
        out = self.output_token_ids
        return out[index] if index < len(out) else None

    def token_slice(self, begin: int, end: int) -> list[int]:
        """`token_ids[begin:end]` without building the whole list."""
        prompt = self.prompt_token_ids
        if begin >= len(prompt):
            return self.output_token_ids[begin - len(prompt):end - len(prompt)]
        return prompt[begin:end] + self.output_token_ids[:max(0, end - len(prompt))]

    @property
    def num_tokens(self) -> int:
        """Tokens the scheduler counts: known ones plus any still in flight (their KV comes next)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_in_flight

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def stopped_by_token(self) -> bool:
        """The newest token is a stop or EOS token that may end the sample (min_tokens are out)."""
        out = self.output_token_ids
        return bool(out) and out[-1] in self.stop_token_ids and len(out) >= self.params.min_tokens

    @property
    def num_remaining(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SampleStatus.FINISHED

    @property
    def is_running(self) -> bool:
        return self.status is SampleStatus.RUNNING


@dataclass
class SampleProgress:
    """What a sample has reported: the delta bookkeeping between two outputs of its request."""

    reported_tokens: int = 0  # output token ids already sent in a delta
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not sent yet
    reported_finish: bool = False


@dataclass
class Request:
    """A validated request and its per-sample engine state."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[Sample]
    detoks: list[IncrementalDetokenizer]
    progress: list[SampleProgress]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # scored so far, when asked (the first token: None)
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        for sample in self.samples:  # a loop, not all(genexpr): this runs for every request every step
            if sample.finish_reason is None:
                return False
        return True
