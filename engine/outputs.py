"""What the engine hands back for each request after a step: deltas, and their accumulation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first
    rank: int | None = None  # prompt logprobs: the token's rank in its distribution (1 = most likely)


@dataclass(slots=True)  # made for every changed sample every step: slots make that cheaper
class CompletionOutput:
    """One of a request's `n` samples.

    From `LLMEngine.step` (and `AsyncEngine.generate`) this is a DELTA, vLLM v1's shape: `text`,
    `token_ids` and `logprobs` hold only what is new since this sample's previous output, so a
    step's cost never grows with the sequence. Samples with nothing new are left out of an output;
    a sample's last delta carries its `finish_reason`. `RequestAccumulator` (used by
    `LLM.generate` and non-streamed server responses) merges deltas into the whole completion.
    """

    index: int
    text: str  # new text (a tail that may still turn into a stop string is held back until decided)
    token_ids: list[int]  # new token ids (a stop token is included, its text is not)
    logprobs: list[TokenLogprob] | None = None  # one per new token id; None when the request asked for none
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it (an error message on abort)
    num_generated: int = 0  # tokens this sample has generated so far, all deltas together

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's new output after a step: `outputs` holds the samples that changed (see CompletionOutput)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool  # every sample has finished; no output of this request follows
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_draft_tokens: int = 0  # speculative decoding, all samples so far: drafted tokens verified
    num_accepted_tokens: int = 0  # ... and accepted
    # prompt logprobs (when asked): one entry per prompt token, None for the first; in the request's first output
    prompt_logprobs: list[TokenLogprob | None] | None = None


def merge_delta(earlier: RequestOutput, later: RequestOutput) -> None:
    """Fold `later` into `earlier` (two consecutive deltas of one request), so that one output covers both steps:
    each sample's new text, ids and logprobs appended, its finish taken from the later one."""
    samples = {sample.index: sample for sample in earlier.outputs}
    for delta in later.outputs:
        sample = samples.get(delta.index)
        if sample is None:
            earlier.outputs.append(delta)
            continue
        sample.text += delta.text
        sample.token_ids.extend(delta.token_ids)
        if sample.logprobs is not None and delta.logprobs is not None:
            sample.logprobs.extend(delta.logprobs)
        sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_reason
        sample.num_generated = delta.num_generated
    earlier.finished = later.finished
    earlier.num_cached_tokens = later.num_cached_tokens
    earlier.num_draft_tokens, earlier.num_accepted_tokens = later.num_draft_tokens, later.num_accepted_tokens
    if earlier.prompt_logprobs is None:
        earlier.prompt_logprobs = later.prompt_logprobs


class RequestAccumulator:
    """Merges one request's deltas; `result()` is the whole completion, one CompletionOutput per sample."""

    def __init__(self) -> None:
        self.prompt_token_ids: list[int] = []
        self.num_cached_tokens = 0
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finished = False
        self._samples: dict[int, tuple[CompletionOutput, list[str]]] = {}  # text pieces joined once, at the end

    def add(self, output: RequestOutput) -> None:
        self.prompt_token_ids, self.num_cached_tokens = output.prompt_token_ids, output.num_cached_tokens
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.finished = output.finished
        for delta in output.outputs:
            if delta.index not in self._samples:
                whole = CompletionOutput(delta.index, "", [], None if delta.logprobs is None else [])
                self._samples[delta.index] = (whole, [])
            whole, pieces = self._samples[delta.index]
            pieces.append(delta.text)
            whole.token_ids.extend(delta.token_ids)
            if delta.logprobs is not None and whole.logprobs is not None:
                whole.logprobs.extend(delta.logprobs)
            whole.finish_reason, whole.stop_reason = delta.finish_reason, delta.stop_reason
            whole.num_generated = delta.num_generated

    def samples(self) -> list[CompletionOutput]:
        """Every sample seen so far, by index, with its text joined."""
        merged = []
        for index in sorted(self._samples):
            whole, pieces = self._samples[index]
            whole.text = "".join(pieces)
            merged.append(whole)
        return merged

    def result(self, request_id: str) -> RequestOutput:
        return RequestOutput(request_id, self.prompt_token_ids, self.samples(), self.finished, self.num_cached_tokens,
                             prompt_logprobs=self.prompt_logprobs)
