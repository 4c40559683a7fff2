"""Incremental detokenization with stop strings: never emits half a UTF-8 character or part of a stop.

The tokenizer's text stream keeps its own short window of ids; only the text not yet handed out
is kept here, so adding a token costs the same at the 10th token as at the 10,000th. One sample's
rules for text live here, whoever runs them: the engine in-process (engine/output_processor.py) or
an API process in front of an engine core process (engine/stream_text.py).
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tail fed first so a first token's leading space decodes right


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; `take_delta` hands out the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True, ending_token_ids: frozenset[int] = frozenset(),
                 min_tokens: int = 0) -> None:
        """`ending_token_ids`: stop and EOS ids (SamplingParams.ending_token_ids), which add no text once
        `min_tokens` are out; stop strings are searched from then on too."""
        self.stream = tokenizer.text_stream(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:], skip_special_tokens)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ending_token_ids = ending_token_ids
        self.min_tokens = min_tokens
        self.pending = ""  # decided text not handed out yet (stop strings are searched here only)
        self.stopped_by: str | None = None

    @classmethod
    def for_sample(cls, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                   ending_token_ids: frozenset[int]) -> IncrementalDetokenizer:
        """One sample's detokenizer with its request's text rules, alike in the engine and in an API process."""
        return cls(tokenizer, prompt_token_ids, params.stop, params.skip_special_tokens, ending_token_ids,
                   params.min_tokens)

    def add(self, token_id: int, num_generated: int) -> None:
        """The sample's `num_generated`-th token (counting from 1)."""
        rules_apply = num_generated >= self.min_tokens
        if rules_apply and token_id in self.ending_token_ids:
            return  # a stop or EOS token ends the sample and adds no text
        delta = self.stream.step(token_id)
        if not delta:
            return
        start = max(0, len(self.pending) - self.longest_stop + 1)
        self.pending += delta
        if rules_apply and self.stop:
            self._find_stop(start)

    def _find_stop(self, start: int) -> None:
        hits = [(self.pending.find(s, start), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, stop = min(hits)
            self.pending = self.pending[:pos]
            self.stopped_by = stop

    def finish(self, finish_reason: str | None, stop_reason: str | int | None) -> tuple[str | None, str | int | None]:
        """The sample's finish once a stop string was found in the token it just added: "stop" with that string,
        unless a token rule (a stop token, the grammar) ended the sample on that same token."""
        if self.stopped_by is not None and finish_reason in (None, "length"):
            return "stop", self.stopped_by
        return finish_reason, stop_reason

    def take_delta(self, finished: bool) -> str:
        """New text safe to show: holds back a tail that could still begin a stop string.

        Shown text never ends with a stop string's beginning, so a stop always starts in `pending`.
        """
        end = len(self.pending)
        if not finished:
            for stop in self.stop:
                for length in range(min(len(stop) - 1, end), 0, -1):
                    if self.pending.endswith(stop[:length]):
                        end = min(end, len(self.pending) - length)
                        break
        delta, self.pending = self.pending[:end], self.pending[end:]
        return delta
