"""Triton RMSNorm, RoPE, gated activations and KV-cache write against kernels.reference."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICES, assert_close, interpreter, poisoned_outputs  # noqa: F401
from kernels import reference, triton_ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 37), (3, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device, dtype, rows, cols, with_residual):
    x = torch.randn(rows, cols, device=device).to(dtype)
    weight = torch.randn(cols, device=device).to(dtype)
    residual = torch.randn(rows, cols, device=device).to(dtype) if with_residual else None
    got = triton_ops.rms_norm(x, weight, 1e-5, residual)
    want = reference.rms_norm(x, weight, 1e-5, residual)
    if with_residual:
        assert_close(got[0], want[0])
        assert_close(got[1], want[1])
    else:
        assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_keeps_leading_dims(device):
    x = torch.randn(2, 3, 16, device=device)
    weight = torch.randn(16, device=device)
    assert_close(triton_ops.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))


def _inv_freq(kind: str, rot: int) -> tuple[torch.Tensor, float]:
    """Plain, llama3-like (low frequencies divided down) and YaRN-like (blend + mscale) tables."""
    base = 1.0 / (10000.0 ** (torch.arange(0, rot, 2).float() / rot))
    if kind == "plain":
        return base, 1.0
    if kind == "llama3":
        return torch.where(base < 0.05, base / 8.0, base), 1.0
    ramp = torch.linspace(0, 1, rot // 2)
    return base / 32 * (1 - ramp) + base * ramp, 0.1 * torch.log(torch.tensor(32.0)).item() + 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["plain", "llama3", "yarn"])
@pytest.mark.parametrize("head_dim,rot", [(64, 64), (24, 16)])
def test_rope(device, dtype, kind, head_dim, rot):
    tokens, heads, kv_heads = 5, 4, 2
    # q and k as views of one fused qkv projection, as models produce them.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 5000, (tokens,), device=device)
    inv_freq, mscale = _inv_freq(kind, rot)
    got = triton_ops.rope(q, k, positions, inv_freq.to(device), mscale)
    want = reference.rope(q, k, positions, inv_freq.to(device), mscale)
    # fp32 cos/sin of angles in the thousands differ by ulps between libm implementations.
    tol = torch.float16 if dtype == torch.float32 and device == "cuda" else dtype
    assert_close(got[0], want[0], tol)
    assert_close(got[1], want[1], tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 38), (3, 2 * 1100)])
def test_silu_and_mul(device, dtype, shape):
    x = (3 * torch.randn(*shape, device=device)).to(dtype)
    assert_close(triton_ops.silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 38), (2, 4, 66)])
def test_swiglu_oss_clamps(device, dtype, shape):
    x = (6 * torch.randn(*shape, device=device)).to(dtype)  # many values past the clamp limit 7
    assert_close(triton_ops.swiglu_oss(x), reference.swiglu_oss(x))
    assert_close(triton_ops.swiglu_oss(x, alpha=1.0, limit=2.5), reference.swiglu_oss(x, alpha=1.0, limit=2.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,kv_heads,head_dim", [(16, 2, 64), (32, 3, 128), (16, 1, 24)])
def test_write_kv_cache(device, dtype, block_size, kv_heads, head_dim):
    tokens, num_blocks = 9, 4
    kv = torch.randn(tokens, 2 * kv_heads, head_dim, device=device).to(dtype)
    k, v = kv[:, :kv_heads], kv[:, kv_heads:]  # strided views, as split from a projection
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[[2, 5]] = -1  # padding tokens
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), device=device, dtype=dtype) for _ in range(4)]
    triton_ops.write_kv_cache(k, v, caches[0], caches[1], slots)
    reference.write_kv_cache(k, v, caches[2], caches[3], slots)
    # Written slots equal the reference bit for bit; every other slot stays NaN.
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(caches[0]).sum() == (num_blocks * block_size - 7) * kv_heads * head_dim


@pytest.mark.parametrize("device", DEVICES)
def test_write_kv_cache_rejects_strided_cache(device):
    cache = torch.zeros(2, 16, 2, 8, device=device)[:, :, :1]
    k = torch.zeros(1, 1, 8, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.write_kv_cache(k, k, cache, cache, torch.zeros(1, dtype=torch.long, device=device))


def test_select_ops_picks_triton_on_cuda_and_the_cpu_backend_on_cpu():
    from kernels import cpu_ops, select_ops

    assert select_ops("cuda") is triton_ops
    assert select_ops("cpu") is cpu_ops
    assert select_ops("cpu", backend="torch") is reference
    assert select_ops("cpu", backend="triton") is triton_ops


def test_shape_mismatches_raise_value_error():
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="weight"):
        triton_ops.rms_norm(x, torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        triton_ops.rms_norm(x, torch.ones(16), 1e-5, torch.randn(2, 16))
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    with pytest.raises(ValueError, match="head_dim >= 32"):
        triton_ops.rope(q, k, torch.arange(3), torch.ones(16))
    with pytest.raises(ValueError, match="tokens=2"):
        triton_ops.rope(q, k, torch.arange(2), torch.ones(4))
    cache = torch.zeros(2, 16, 2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        triton_ops.write_kv_cache(q, q, cache, cache, torch.arange(3))
    with pytest.raises(ValueError, match="one slot per token"):
        triton_ops.write_kv_cache(k, k, cache, cache, torch.arange(2))


@pytest.mark.parametrize("device", DEVICES)
def test_rope_many_heads(device):
    # 70 heads of 128 span three head blocks per token, the last one partial.
    q = torch.randn(3, 70, 128, device=device)
    k = torch.randn(3, 6, 128, device=device)
    positions = torch.tensor([0, 5, 900], device=device)
    inv_freq, mscale = _inv_freq("yarn", 128)
    got = triton_ops.rope(q, k, positions, inv_freq.to(device), mscale)
    want = reference.rope(q, k, positions, inv_freq.to(device), mscale)
    tol = torch.float16 if device == "cuda" else torch.float32
    assert_close(got[0], want[0], tol)
    assert_close(got[1], want[1], tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rot", [(4, 2, 32, 32), (6, 3, 24, 16)])
def test_rope_write_kv(device, dtype, heads, kv_heads, head_dim, rot):
    """The fused rotation + cache write equals rope then write_kv_cache: q and the written
    slots bit-near, padding tokens (slot -1) and unwritten slots untouched."""
    tokens, block_size, num_blocks = 7, 16, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=device).to(dtype)
    q, k, v = (
        t.view(tokens, -1, head_dim) for t in qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), -1)
    )
    positions = torch.randint(0, 3000, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    slots[3] = -1
    inv_freq, mscale = _inv_freq("yarn", rot)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), device=device, dtype=dtype) for _ in range(4)]
    got = triton_ops.rope_write_kv(q, k, v, positions, inv_freq.to(device), mscale, caches[0], caches[1], slots)
    want = reference.rope_write_kv(q, k, v, positions, inv_freq.to(device), mscale, caches[2], caches[3], slots)
    tol = torch.float16 if dtype == torch.float32 and device == "cuda" else dtype
    assert_close(got, want, tol)
    assert torch.equal(caches[0].isnan(), caches[2].isnan())
    assert caches[0].isnan().sum() == (num_blocks * block_size - (tokens - 1)) * kv_heads * head_dim
    assert_close(caches[0].nan_to_num(), caches[2].nan_to_num(), tol)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0, equal_nan=True)
