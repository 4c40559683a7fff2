"""Block pool: allocation, reference counts, prefix hashes and LRU eviction."""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockPool, NoFreeBlocksError, block_hashes


def test_allocate_free_and_exhaustion():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.free(blocks)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(blocks[:1])


def test_hashes_chain_over_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5], 2)
    b = block_hashes([9, 9, 3, 4], 2)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same block tokens, different parent
    assert block_hashes([1, 2, 3, 4, 5, 6], 2, a) == block_hashes([1, 2, 3, 4, 5, 6], 2)


def test_prefix_lookup_shares_and_counts_hits():
    pool = BlockPool(4, 2)
    hashes = block_hashes([1, 2, 3, 4], 2)
    blocks = pool.allocate(2)
    for block, h in zip(blocks, hashes):
        pool.commit(block, h)
    shared = pool.lookup_prefix(hashes + [12345])
    assert shared == blocks and pool.ref_counts[blocks[0]] == 2
    assert pool.hit_rate == pytest.approx(2 / 3)
    pool.free(blocks)
    pool.free(shared)
    assert pool.num_free == 4
    assert pool.lookup_prefix(hashes) == blocks  # still cached while free
    pool.free(blocks)


def test_lru_eviction_takes_oldest_free_block():
    pool = BlockPool(2, 1)
    old, new = pool.allocate(2)
    pool.commit(old, 1)
    pool.commit(new, 2)
    pool.free([old])
    pool.free([new])
    (reused,) = pool.allocate(1)
    assert reused == old
    assert pool.lookup_prefix([1]) == [] and pool.lookup_prefix([2]) == [new]


def test_prefix_caching_off_never_shares():
    pool = BlockPool(2, 1, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.commit(block, 7)
    assert pool.lookup_prefix([7]) == []
