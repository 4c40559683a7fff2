"""Prompt-lookup n-gram proposals: find the sequence's last n tokens earlier in its prompt and output,
propose the tokens that followed (vLLM's `ngram` method).

Each sequence keeps an index from every n-gram (prompt_lookup_min <= n <= prompt_lookup_max) to
where the tokens after its latest earlier occurrence begin, extended as tokens arrive, so a
proposal is a few dictionary lookups however long the context is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.spec_decode.tokens import TokenSource


class NgramIndex:
    """One sequence's tokens and, per n, n-gram -> index of the token that followed its latest occurrence."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.sizes = range(n_max, n_min - 1, -1)  # longest first: a longer match predicts better
        self.tables: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.tokens: list[int] = []

    def extend(self, token_ids: Iterable[int]) -> None:
        tokens, tables = self.tokens, self.tables
        for token in token_ids:
            end = len(tokens)  # the n-grams ending just before `token` now have a successor: `token`
            for n, table in tables.items():
                if end >= n:
                    table[tuple(tokens[end - n:end])] = end
            tokens.append(token)

    def propose(self, max_tokens: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the longest matching tail."""
        tokens = self.tokens
        for n in self.sizes:
            if len(tokens) < n:
                continue
            start = self.tables[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + max_tokens]
        return []


class NgramProposer:
    """Per-sequence n-gram indexes, brought up to date from the sequence's tokens at each proposal."""

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.indexes: dict[object, NgramIndex] = {}

    def propose(self, key: object, tokens: TokenSource, max_tokens: int) -> list[int]:
        index = self.indexes.get(key)
        if index is None:
            index = self.indexes[key] = NgramIndex(self.n_min, self.n_max)
        index.extend(tokens.token_slice(len(index.tokens), tokens.num_known_tokens))
        return index.propose(max_tokens)

    def release(self, key: object, output_token_ids: Sequence[int] = ()) -> None:
        """Forget a finished sequence (its output teaches the n-gram method nothing)."""
        self.indexes.pop(key, None)

