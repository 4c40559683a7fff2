"""Incremental detokenization with stop strings: never emits half a UTF-8 character or part of a stop.

Only the text not yet handed out and a short window of token ids are kept, so adding a token
costs the same at the 10th token as at the 10,000th.
"""

from __future__ import annotations

from engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tail kept so a first token's leading space decodes right
TOKEN_WINDOW = 32  # decoded tokens kept before the window is trimmed


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; `take_delta` hands out the text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = stop
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.pending = ""  # decided text not handed out yet (stop strings are searched here only)
        self.stopped_by: str | None = None

    def add(self, token_id: int, check_stop: bool = True) -> None:
        self.tokens.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        prefix = decode(self.tokens[self.prefix_offset:self.read_offset])
        full = decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            start = max(0, len(self.pending) - self.longest_stop + 1)
            self.pending += delta
            if check_stop:
                self._find_stop(start)
        if self.prefix_offset > TOKEN_WINDOW:
            del self.tokens[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0

    def _find_stop(self, start: int) -> None:
        hits = [(self.pending.find(s, start), s) for s in self.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, stop = min(hits)
            self.pending = self.pending[:pos]
            self.stopped_by = stop

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
