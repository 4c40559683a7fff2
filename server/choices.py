"""Bookkeeping shared by both endpoints: which choice an engine sample is, what is new since the last chunk, usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class ChoiceDelta:
    """What one engine output adds to one choice since the previous chunk."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # set once, on the output that finishes the choice
    first: bool  # the first delta of this choice (chat sends the role with it)


@dataclass
class ChoiceTracker:
    """Maps (prompt index, sample index) to OpenAI's choice index and tracks per-choice progress and usage.

    Deltas are cut from the cumulative text and logprobs, so outputs the engine
    coalesced (or updated in place) while the client was slow lose nothing.
    """

    n: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    text_sent: dict[int, int] = field(default_factory=dict)
    logprobs_seen: dict[int, int] = field(default_factory=dict)
    finished: dict[int, str] = field(default_factory=dict)

    def choice_index(self, prompt_index: int, sample: CompletionOutput) -> int:
        return prompt_index * self.n + sample.index

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        deltas = []
        for sample in output.outputs:
            index = self.choice_index(prompt_index, sample)
            if index in self.finished:
                continue
            first = index not in self.completion_tokens
            self.completion_tokens[index] = len(sample.token_ids)
            sent = self.text_sent.get(index, 0)
            new_text = sample.text[sent:]
            self.text_sent[index] = sent + len(new_text)
            seen = self.logprobs_seen.get(index, 0)
            new_logprobs = (sample.logprobs or [])[seen:]
            self.logprobs_seen[index] = seen + len(new_logprobs)
            if sample.finish_reason is not None:
                self.finished[index] = sample.finish_reason
            if new_text or new_logprobs or sample.finish_reason or first:
                deltas.append(ChoiceDelta(index, new_text, new_logprobs, sample.finish_reason, first))
        return deltas

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Collected:
    """The end state of every sample of every prompt of a non-streamed request."""

    n: int
    prompt_token_ids: dict[int, list[int]] = field(default_factory=dict)
    samples: dict[int, CompletionOutput] = field(default_factory=dict)  # by choice index

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self.prompt_token_ids[prompt_index] = output.prompt_token_ids
        for sample in output.outputs:
            self.samples[prompt_index * self.n + sample.index] = sample

    def choices(self) -> list[tuple[int, int, CompletionOutput]]:
        """(choice index, prompt index, sample) in choice order."""
        return [(index, index // self.n, self.samples[index]) for index in sorted(self.samples)]

    def usage(self) -> dict[str, int]:
        prompt = sum(len(ids) for ids in self.prompt_token_ids.values())
        completion = sum(len(s.token_ids) for s in self.samples.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
