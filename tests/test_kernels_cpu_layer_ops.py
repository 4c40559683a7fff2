"""The CPU backend's fused per-layer ops (kernels/cpu/layer_ops.cpp) and its SDPA prefill against
kernels.reference on random inputs: fp32, equal to 1e-5 (the sums run in another order). The KV cache is
fp32, fp16 or bf16 in both: the reference stores and reads the same rounded values."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_ops, reference
from kernels.cpu import extension

TOL = dict(rtol=1e-5, atol=1e-5)
CACHE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def native():
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")


def test_rms_norm_with_and_without_residual():
    x, residual, weight = torch.randn(5, 72), torch.randn(5, 72), torch.randn(72)
    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), **TOL)
    out, total = cpu_ops.rms_norm(x, weight, 1e-5, residual)
    expected_out, expected_total = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(total, expected_total, **TOL)


def test_silu_and_mul():
    gate_up = torch.randn(3, 2 * 40)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), **TOL)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("rotary_dim", [16, 8])  # 8: partial rotary, the rest passes through
def test_rope_write_kv_on_strided_views(rotary_dim, cache_dtype):
    heads, kv_heads, head_dim, tokens = 4, 2, 16, 6
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)  # views of one matmul output, as the model has
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in (q, k, v))
    positions = torch.tensor([0, 1, 2, 7, 30, 31])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    slots = torch.tensor([3, 9, -1, 0, 14, 5])
    caches = [torch.zeros(4, 4, kv_heads, head_dim, dtype=cache_dtype) for _ in range(4)]
    got = cpu_ops.rope_write_kv(q, k, v, positions, inv_freq, 1.25, caches[0], caches[1], slots)
    expected = reference.rope_write_kv(q, k, v, positions, inv_freq, 1.25, caches[2], caches[3], slots)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0)  # v: the same rounding to the cache's dtype
    # k: rotated by sin/cos computed in another order, so a value on a rounding boundary may land one step away
    step = dict(rtol=torch.finfo(cache_dtype).eps, atol=1e-5)
    torch.testing.assert_close(caches[0], caches[2], **step)


def paged(seq_lens: list[int], q_lens: list[int], block_size: int = 4, heads: int = 6, kv_heads: int = 2,
          head_dim: int = 16, cache_dtype: torch.dtype = torch.float32):
    """Random caches with shuffled block tables and queries for the last `q_lens` tokens of each sequence."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    order = torch.randperm(sum(blocks_per_seq) + 3)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    start = 0
    for i, count in enumerate(blocks_per_seq):
        tables[i, :count] = order[start:start + count]
        start += count
    k_cache, v_cache = (torch.randn(len(order), block_size, kv_heads, head_dim).to(cache_dtype) for _ in range(2))
    q = torch.randn(sum(q_lens), heads, head_dim)
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), query_start_loc


@pytest.mark.parametrize("seq_lens,q_lens", [([5, 1, 13], [1, 1, 1]),  # decode: native, read in place
                                             ([7, 12], [7, 5]),  # a prefill and a chunk after cached context
                                             ([9, 6, 3], [1, 6, 1]),  # decodes beside a prefill
                                             ([300, 41], [270, 1])])  # a long prefill beside a decode
@pytest.mark.parametrize("head_dim", [16, 64, 128])  # 64 and 128: the flash-style kernel where AVX-512 is here
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_paged_attention(seq_lens, q_lens, head_dim, cache_dtype):
    args = paged(seq_lens, q_lens, head_dim=head_dim, cache_dtype=cache_dtype)
    torch.testing.assert_close(cpu_ops.paged_attention(*args, 0.25), reference.paged_attention(*args, 0.25), **TOL)


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])  # GQA groups of 3, 1 and 8
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_flash_attention_tiles_groups_and_blocks(heads, kv_heads, block_size, cache_dtype):
    """Query tiles (64 rows of (query, head) per task), key blocks of 64 across cache blocks of any size
    (partial ones at the end), a chunk after cached context with decodes beside it, and short chunks at
    long context whose rows come in fours and a remainder."""
    args = paged([1, 200, 37, 70, 150, 141], [1, 130, 37, 1, 2, 5], block_size=block_size, heads=heads,
                 kv_heads=kv_heads, head_dim=64, cache_dtype=cache_dtype)
    got = extension.load().paged_attention(*args, 0.125)
    torch.testing.assert_close(got, reference.paged_attention(*args, 0.125), **TOL)


def test_native_paged_attention_takes_chunks_too():
    """The native kernel's own contract covers several queries per sequence (the backend sends it decodes)."""
    q, k_cache, v_cache, tables, seq_lens, starts = paged([9, 6, 12], [1, 6, 4])
    got = extension.load().paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, 0.25)
    torch.testing.assert_close(got, reference.paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, 0.25), **TOL)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 48])  # 48: the generic kernel (no flash path), converting per element
def test_half_caches_at_block_and_key_step_boundaries(cache_dtype, head_dim):
    """Contexts ending on, just before and just past a cache block (16) and a 64-key softmax step, with
    queries from one to a whole sequence: each reads the same rounded cache as the reference."""
    args = paged([64, 128, 129, 63, 16, 17], [1, 64, 3, 63, 16, 1], block_size=16, heads=9, kv_heads=3,
                 head_dim=head_dim, cache_dtype=cache_dtype)
    torch.testing.assert_close(extension.load().paged_attention(*args, 0.125), reference.paged_attention(*args, 0.125), **TOL)


def test_caches_of_two_dtypes_are_refused():
    q, k_cache, v_cache, tables, seq_lens, starts = paged([5], [1], head_dim=64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        extension.load().paged_attention(q, k_cache, v_cache.half(), tables, seq_lens, starts, 0.25)


@pytest.mark.parametrize("threads", [2, 8])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_long_contexts_split_over_threads_merge_exactly(threads, cache_dtype):
    """Fewer (query tile, kv heads) tasks than threads: a long context's keys are split across tasks (at
    least 512 keys each, 64-key aligned, the last one shorter) and their partial softmaxes merged."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seq_lens, q_lens in (([3000], [1]), ([1100, 2600], [1, 3]), ([1700], [20]), ([1030, 9], [2, 1])):
            args = paged(seq_lens, q_lens, block_size=16, heads=9, kv_heads=3, head_dim=64, cache_dtype=cache_dtype)
            got = extension.load().paged_attention(*args, 0.125)
            torch.testing.assert_close(got, reference.paged_attention(*args, 0.125), **TOL)
    finally:
        torch.set_num_threads(before)
