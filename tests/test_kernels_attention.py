"""Triton paged attention (prefill, chunked prefill, decode with split-K) against kernels.reference."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICES, assert_close, interpreter, poisoned_outputs  # noqa: F401
from kernels import reference, triton_ops
from kernels.triton.attention import paged_attention as triton_paged_attention


def _batch(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, device):
    """Random q and a paged K/V cache with shuffled block tables (plus spare, unused blocks)."""
    num_seqs = len(seq_lens)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = num_seqs * max_blocks + 2
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    tables = torch.randperm(num_blocks, device=device)[: num_seqs * max_blocks].view(num_seqs, max_blocks)
    q = torch.randn(sum(q_lens), heads, head_dim, device=device).to(dtype)
    starts = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, device=device, dtype=torch.int32)
    return q, k_cache, v_cache, tables.to(torch.int32), lens, starts


def _check(q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, device, window=None, sinks=False,
           num_splits=None):
    q, k_cache, v_cache, tables, lens, starts = _batch(
        q_lens, seq_lens, heads, kv_heads, head_dim, block_size, dtype, device
    )
    sink = 2 * torch.randn(heads, device=device) if sinks else None
    scale = head_dim**-0.5
    want = reference.paged_attention(q, k_cache, v_cache, tables, lens, starts, scale, window, sink)
    got = triton_paged_attention(q, k_cache, v_cache, tables, lens, starts, scale, window, sink, num_splits=num_splits)
    assert_close(got, want)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
def test_prefill_several_sequences(device, dtype, head_dim, block_size):
    # Whole prompts of different lengths in one launch; 8 query heads on 2 KV heads.
    _check([5, 1, 19], [5, 1, 19], 8, 2, head_dim, block_size, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,sinks", [(None, False), (None, True), (6, False), (6, True)])
def test_chunked_prefill_with_decodes(device, dtype, window, sinks):
    # Chunks over a cached prefix, a fresh prompt and decodes mixed in any order.
    _check([7, 1, 12, 1], [40, 23, 12, 3], 6, 2, 64, 16, dtype, device, window=window, sinks=sinks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 2)])
def test_decode_split_k(device, dtype, num_splits, heads, kv_heads):
    _check([1, 1, 1], [70, 2, 33], heads, kv_heads, 64, 16, dtype, device, num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window,sinks", [(8, True), (1, False), (200, True)])
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_window_and_sinks(device, window, sinks, num_splits):
    # Splits that see no key (outside the window) must merge as empty, not as NaN.
    _check([1, 1], [90, 5], 8, 2, 64, 32, torch.float32, device, window=window, sinks=sinks, num_splits=num_splits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_random_batches(device, seed):
    generator = torch.Generator().manual_seed(seed)
    num_seqs = int(torch.randint(1, 5, (1,), generator=generator))
    seq_lens = torch.randint(1, 60, (num_seqs,), generator=generator).tolist()
    q_lens = [int(torch.randint(1, s + 1, (1,), generator=generator)) for s in seq_lens]
    window = [None, 9][seed % 2]
    _check(q_lens, seq_lens, 4, 2, 64, 16, torch.float16, device, window=window, sinks=seed > 0)


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch_through_triton_ops(device):
    q, k_cache, v_cache, tables, lens, starts = _batch([3, 1], [3, 20], 4, 2, 32, 16, torch.float32, device)
    # int64 metadata (the engine's is int32) works the same.
    got = triton_ops.paged_attention(q, k_cache, v_cache, tables.long(), lens.long(), starts.long(), 0.2)
    assert_close(got, reference.paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_shapes(device):
    q, k_cache, v_cache, tables, lens, starts = _batch([1], [4], 3, 2, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="do not divide"):
        triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.2)
    q, k_cache, v_cache, tables, lens, starts = _batch([1], [4], 4, 2, 32, 16, torch.float32, device)
    with pytest.raises(ValueError, match="power of two"):
        triton_paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.2, num_splits=3)


def test_inconsistent_metadata_raises_value_error():
    q, k_cache, v_cache, tables, lens, starts = _batch([2, 1], [4, 3], 4, 2, 32, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sequence count"):
        triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, starts[:-1], 0.2)
    with pytest.raises(ValueError, match="does not fit"):
        triton_ops.paged_attention(q[..., :16], k_cache, v_cache, tables, lens, starts, 0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpt_oss_grouping(device, dtype):
    # gpt-oss groups 8 query heads per KV head (16 new tokens per 128-row prefill tile), window 5, sinks.
    _check([11, 1, 3], [30, 17, 3], 16, 2, 64, 16, dtype, device, window=5, sinks=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "q_lens,seq_lens,window",
    [([40, 1], [50, 30], None), ([40, 1], [50, 30], 20), ([80], [80], 47)],  # 47: key 32 just leaves the last tile's window
)
def test_long_prefill_interior_and_diagonal_tiles(device, q_lens, seq_lens, window):
    # Several query tiles (after a cached prefix): key tiles fully visible (unmasked), on the
    # diagonal, at the window's edge, and past the context's end all meet in one launch.
    _check(q_lens, seq_lens, 16, 2, 64, 16, torch.float32, device, window=window, sinks=True)


@pytest.mark.parametrize("window,sinks", [(None, False), (5, True), (None, True)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_reference_decode_batch_equals_per_sequence_loop_and_sdpa(monkeypatch, window, sinks, heads, kv_heads):
    """The reference's one-batch decode path against its per-sequence loop, and against torch SDPA."""
    seq_lens = [1, 7, 19, 12]
    q, k_cache, v_cache, tables, lens, starts = _batch([1] * 4, seq_lens, heads, kv_heads, 16, 4, torch.float32, "cpu")
    sink = 2 * torch.randn(heads) if sinks else None
    batched = reference.paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.25, window, sink)
    monkeypatch.setattr(reference, "_DECODE_BATCH_ELEMENTS", 0)
    looped = reference.paged_attention(q, k_cache, v_cache, tables, lens, starts, 0.25, window, sink)
    torch.testing.assert_close(batched, looped)
    if sinks:
        return
    for i, seq_len in enumerate(seq_lens):
        k = k_cache[tables[i].long()].flatten(0, 1)[:seq_len].repeat_interleave(heads // kv_heads, dim=1)
        v = v_cache[tables[i].long()].flatten(0, 1)[:seq_len].repeat_interleave(heads // kv_heads, dim=1)
        mask = torch.arange(seq_len) > seq_len - 1 - (window or seq_len)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[i : i + 1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.25
        ).transpose(0, 1)
        torch.testing.assert_close(batched[i : i + 1], want)
