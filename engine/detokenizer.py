"""Incremental detokenization with stop strings: never emits half a UTF-8 character or part of a stop."""

from __future__ import annotations

from engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tail kept so a first token's leading space decodes right


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; `text` is final text, `emittable` what may be shown."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.emitted = 0
        self.stopped_by: str | None = None

    def add(self, token_id: int, check_stop: bool = True) -> None:
        self.tokens.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset])
        full = decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
            self.text += delta
            if check_stop:
                self._find_stop(start)

    def _find_stop(self, start: int) -> None:
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, stop = min(hits)
            self.text = self.text[:pos]
            self.stopped_by = stop

    def take_delta(self, finished: bool) -> str:
        """New text safe to show: holds back a tail that could still begin a stop string."""
        end = len(self.text)
        if not finished:
            for stop in self.stop:
                for length in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:length]):
                        end = min(end, len(self.text) - length)
                        break
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
