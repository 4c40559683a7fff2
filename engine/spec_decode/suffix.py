"""Suffix decoding (Arctic Inference's, vLLM's `suffix` method) without a suffix tree library.

Two depth-limited suffix tries count every substring of up to `max_depth` tokens: one per
sequence over its prompt and output (extended as tokens arrive), and one global trie over the
outputs of the last `max_cached_requests` finished sequences (agents repeat what earlier calls
wrote). A proposal matches a tail of the context in a trie and follows the most frequent
continuation; the speculation length adapts to the match: at most `max_spec_factor` times the
matched length, and only while the continuation's estimated probability (the product of the
chosen children's count shares) stays above `min_token_prob`. The trie whose proposal has the
larger expected number of accepted tokens wins.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from engine.spec_decode.tokens import TokenSource


class Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}
        self.count = 0  # occurrences of the substring this node spells


def best_continuation(node: Node, limit: int, min_prob: float) -> tuple[list[int], float]:
    """Most frequent path below `node`, at most `limit` tokens while its probability holds up;
    with its expected accepted length (the sum of the path's running probabilities)."""
    tokens: list[int] = []
    prob, score = 1.0, 0.0
    while len(tokens) < limit and node.children:
        best_token, best = max(node.children.items(), key=lambda item: item[1].count)  # the first of equals
        prob *= best.count / sum(child.count for child in node.children.values())
        if prob < min_prob:
            break
        tokens.append(best_token)
        score += prob
        node = best
    return tokens, score


class SequenceTrie:
    """One sequence's substrings of up to `max_depth` tokens; `active[i]` spells its last i+1 tokens."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self.root = Node()
        self.active: list[Node] = []
        self.num_tokens = 0

    def extend(self, token_ids: Sequence[int]) -> None:
        root, depth = self.root, self.max_depth
        active = self.active
        for token in token_ids:
            grown = []
            for node in (root, *active):
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = Node()
                child.count += 1
                grown.append(child)
            active = grown[:depth - 1]  # a suffix of max_depth tokens cannot grow further
        self.active = active
        self.num_tokens += len(token_ids)

    def proposals(self, limit_for: Callable[[int], int], min_prob: float) -> tuple[list[int], float]:
        """The best continuation over every tail of the context seen earlier in the sequence."""
        best: tuple[list[int], float] = ([], 0.0)
        for length, node in enumerate(self.active, start=1):
            if node.children:
                found = best_continuation(node, limit_for(length), min_prob)
                if found[1] > best[1]:
                    best = found
        return best


class GlobalTrie:
    """Substrings of recent finished outputs, evicting the oldest output beyond `max_outputs`."""

    def __init__(self, max_depth: int, max_outputs: int) -> None:
        self.max_depth = max_depth
        self.max_outputs = max_outputs
        self.root = Node()
        self.outputs: deque[tuple[int, ...]] = deque()

    def add(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            return
        self.outputs.append(tuple(token_ids))
        self._count(self.outputs[-1], +1)
        while len(self.outputs) > self.max_outputs:
            self._count(self.outputs.popleft(), -1)

    def _count(self, token_ids: tuple[int, ...], delta: int) -> None:
        for start in range(len(token_ids)):
            node = self.root
            for token in token_ids[start:start + self.max_depth]:
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = Node()
                child.count += delta
                if child.count == 0:
                    del node.children[token]  # its whole subtree counted only this output
                    break
                node = child

    def proposal(self, context: Sequence[int], limit_for: Callable[[int], int], min_prob: float) -> tuple[list[int], float]:
        """The continuation of the longest tail of `context` that some cached output continues."""
        for length in range(min(len(context), self.max_depth - 1), 0, -1):
            node = self.root
            for token in context[len(context) - length:]:
                child = node.children.get(token)
                if child is None:
                    break
                node = child
            else:
                if node.children:
                    return best_continuation(node, limit_for(length), min_prob)
        return [], 0.0


class SuffixProposer:
    def __init__(self, max_depth: int, max_cached_requests: int, max_spec_factor: float,
                 min_token_prob: float) -> None:
        self.max_depth = max_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.tries: dict[object, SequenceTrie] = {}
        self.cache = GlobalTrie(max_depth, max_cached_requests)

    def propose(self, key: object, tokens: TokenSource, max_tokens: int) -> list[int]:
        trie = self.tries.get(key)
        if trie is None:
            trie = self.tries[key] = SequenceTrie(self.max_depth)
        trie.extend(tokens.token_slice(trie.num_tokens, tokens.num_known_tokens))

        def limit_for(match_length: int) -> int:
            return min(max_tokens, max(1, int(self.max_spec_factor * match_length)))

        own = trie.proposals(limit_for, self.min_token_prob)
        if self.cache.outputs:
            tail = tokens.token_slice(max(0, trie.num_tokens - self.max_depth), trie.num_tokens)
            cached = self.cache.proposal(tail, limit_for, self.min_token_prob)
            if cached[1] > own[1]:
                return cached[0]
        return own[0]

    def release(self, key: object, output_token_ids: Sequence[int] = ()) -> None:
        """Forget a finished sequence; its output joins the global cache."""
        self.tries.pop(key, None)
        self.cache.add(output_token_ids)
