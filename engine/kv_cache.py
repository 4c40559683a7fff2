"""The KV block pool: free list in LRU order, reference counts and prefix-cache hashes.

A block's hash is `hash((parent_hash, tokens_of_this_block))`, so equal hashes mean equal
whole prefixes. Freed blocks keep their hash and stay findable until they are reused:
allocation takes the least recently freed block first, which evicts LRU cached prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class NoFreeBlocksError(RuntimeError):
    """The pool cannot supply the blocks asked for: a caller's bug, since the scheduler checks `num_free`
    before it allocates (and preempts when too few are free)."""


def block_hashes(token_ids: Sequence[int], block_size: int, start: Sequence[int] = ()) -> list[int]:
    """Chained hashes of every full block of `token_ids`; `start` are hashes already known for its first blocks."""
    hashes = list(start)
    for begin in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[begin:begin + block_size]))
    return hashes


def chain_hash(parent: int | None, block_token_ids: Sequence[int]) -> int:
    """A full block's hash: its tokens and everything before it (through the parent's hash)."""
    return hash((parent, tuple(block_token_ids)))


class BlockPool:
    """Fixed pool of `num_blocks` KV blocks shared by all sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # blocks looked up in the prefix cache
        self.prefix_hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (ref count 1), evicting the least recently freed cached ones."""
        if count > len(self.free_queue):
            raise NoFreeBlocksError(f"asked for {count} KV blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(count):
            block, _ = self.free_queue.popitem(last=False)
            self._forget_hash(block)
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def lookup_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the cached blocks of the longest cached prefix of `hashes`."""
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for block_hash in hashes:
            block = self.cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        self.prefix_queries += len(hashes)
        self.prefix_hits += len(blocks)
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        return blocks

    def commit(self, block: int, block_hash: int) -> None:
        """Record that `block` now holds the full block whose chained hash is `block_hash`."""
        if not self.enable_prefix_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:
            return  # an identical block exists; this copy stays private
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; tail blocks go to the LRU end first so they are evicted first."""
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"KV block {block} freed twice")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None

    def _forget_hash(self, block: int) -> None:
        block_hash = self.block_hash[block]
        if block_hash is not None:
            self.cached.pop(block_hash, None)
            self.block_hash[block] = None
