"""Bookkeeping shared by both endpoints: which choice an engine sample is, what is new since the last chunk, usage."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, RequestAccumulator, RequestOutput, TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


@dataclass
class ChoiceDelta:
    """What one engine output adds to one choice: the engine's delta, placed at its OpenAI choice index."""

    index: int
    text: str  # new text
    token_ids: list[int]  # new token ids
    logprobs: list[TokenLogprob]  # one per new token id when logprobs were asked for
    finish_reason: str | None  # set once, on the output that finishes the choice
    first: bool  # the first delta of this choice (chat sends the role with it)


@dataclass
class ChoiceTracker:
    """Maps (prompt index, sample index) to OpenAI's choice index and counts usage from the engine's deltas."""

    n: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def choice_index(self, prompt_index: int, sample: CompletionOutput) -> int:
        return prompt_index * self.n + sample.index

    def deltas(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        deltas = []
        for sample in output.outputs:
            index = self.choice_index(prompt_index, sample)
            first = index not in self.completion_tokens
            self.completion_tokens[index] = sample.num_generated
            deltas.append(ChoiceDelta(index, sample.text, sample.token_ids, sample.logprobs or [],
                                      sample.finish_reason, first))
        return deltas

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(self.completion_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Collected:
    """Every sample of every prompt of a non-streamed request, its deltas merged."""

    n: int
    requests: dict[int, RequestAccumulator] = field(default_factory=dict)  # by prompt index

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        self.requests.setdefault(prompt_index, RequestAccumulator()).add(output)

    def choices(self) -> list[tuple[int, int, CompletionOutput]]:
        """(choice index, prompt index, whole sample) in choice order."""
        return sorted((prompt_index * self.n + sample.index, prompt_index, sample)
                      for prompt_index, merged in self.requests.items() for sample in merged.samples())

    def best_choices(self, n: int) -> list[tuple[int, int, CompletionOutput]]:
        """best_of: each prompt's `n` samples of highest cumulative logprob, as that prompt's choices 0..n-1."""
        chosen = []
        for prompt_index, merged in sorted(self.requests.items()):
            ranked = sorted(merged.samples(), key=lambda sample: -sum(e.logprob for e in sample.logprobs or []))
            chosen += [(prompt_index * n + rank, prompt_index, sample) for rank, sample in enumerate(ranked[:n])]
        return chosen

    def usage(self) -> dict[str, int]:
        """Every generated token counts, the samples best_of left out too (as OpenAI bills them)."""
        prompt = sum(len(merged.prompt_token_ids) for merged in self.requests.values())
        completion = sum(len(sample.token_ids) for _, _, sample in self.choices())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
