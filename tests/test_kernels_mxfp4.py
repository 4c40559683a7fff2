"""Triton MXFP4 matmul (dense linear and grouped MoE) against kernels.reference and kernels.mxfp4."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICES, assert_close, interpreter, poisoned_outputs  # noqa: F401
from kernels import mxfp4, reference, triton_ops
from kernels.mxfp4 import MXFP4Tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mxfp4(shape, device) -> MXFP4Tensor:
    return mxfp4.quantize(torch.randn(shape)).to(device)


# Scale ranges whose decoded values are normal numbers of the activation dtype (a GPU may
# flush subnormals): 2^-125..2^113 for fp32/bf16, 2^-12..2^13 for fp16.
SCALE_RANGES = {torch.float32: (2, 240), torch.bfloat16: (2, 240), torch.float16: (115, 140)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_and_scale_decodes_exactly(device, dtype):
    # An identity activation reads the weight back: all 256 byte values, the extreme scales.
    out_features, in_features = 16, 512
    blocks = torch.arange(256, dtype=torch.uint8).repeat(out_features * in_features // 512).view(
        out_features, in_features // 32, 16
    )
    low, high = SCALE_RANGES[dtype]
    scales = torch.randint(low, high + 1, (out_features, in_features // 32), dtype=torch.uint8)
    scales[0, :2] = torch.tensor([low, high])
    weight = MXFP4Tensor(blocks, scales).to(device)
    eye = torch.eye(in_features, device=device, dtype=dtype)
    got = triton_ops.linear(eye, triton_ops.prepare_weight(weight))
    torch.testing.assert_close(got.T.cpu(), mxfp4.dequantize(blocks, scales, dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n,k,bias", [(40, 64, True), (96, 224, False)])
def test_linear_mxfp4(device, dtype, m, n, k, bias):
    # K 224 = one swizzled block of 128 + the remainder's blocks of 64 and 32; K 64: a half block alone.
    weight = _mxfp4((n, k), device)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    x = torch.randn(m, k, device=device).to(dtype)
    assert_close(triton_ops.linear(x, triton_ops.prepare_weight(weight), b), reference.linear(x, weight, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,splits", [(1, 544, 2), (5, 544, 3), (3, 224, 2), (2, 1024, 5)])
def test_linear_split_k_partials_sum_to_the_reference(device, dtype, m, k, splits):
    # Split-K for small grids: fp32 partials (the last split also takes K's remainder blocks), summed in
    # order with the bias once and rounded once, as the reference rounds.
    weight = _mxfp4((40, k), device)
    b = torch.randn(40, device=device).to(dtype)
    x = torch.randn(m, k, device=device).to(dtype)
    got = triton_ops.linear(x, triton_ops.prepare_weight(weight), b, num_splits=splits)
    assert_close(got, reference.linear(x, weight, b))
    assert triton_ops.linear(x[:0], triton_ops.prepare_weight(weight), b, num_splits=splits).shape == (0, 40)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_keeps_leading_dims_and_dense_weights(device):
    x = torch.randn(2, 3, 64, device=device)
    weight = _mxfp4((48, 64), device)
    assert_close(triton_ops.linear(x, triton_ops.prepare_weight(weight)), reference.linear(x, weight))
    dense = torch.randn(48, 64, device=device)
    assert_close(triton_ops.linear(x, dense), reference.linear(x, dense))


def _moe_inputs(tokens, experts, top_k, hidden, inter, quantized, dtype, device, bias=True):
    def weight(shape):
        return _mxfp4(shape, device) if quantized else torch.randn(shape, device=device).to(dtype) * 0.2

    w_gate_up, w_down = weight((experts, 2 * inter, hidden)), weight((experts, hidden, inter))
    b_gate_up = torch.randn(experts, 2 * inter, device=device).to(dtype) if bias else None
    b_down = torch.randn(experts, hidden, device=device).to(dtype) if bias else None
    x = torch.randn(tokens, hidden, device=device).to(dtype) * 0.5
    # Route only to the first experts so some get no token at all.
    logits = torch.randn(tokens, experts, device=device)
    logits[:, experts // 2 :] -= 4
    probs, ids = reference.moe_route(logits, top_k)
    return x, ids, probs, w_gate_up, b_gate_up, w_down, b_down


def _swizzled(args):
    """The same MoE arguments with the weights as the Triton backend prepares them at load."""
    x, ids, probs, w_gate_up, b_gate_up, w_down, b_down = args
    prepare = triton_ops.prepare_weight
    return x, ids, probs, prepare(w_gate_up), b_gate_up, prepare(w_down), b_down


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 6, 37])
@pytest.mark.parametrize("quantized", [True, False])
def test_moe_experts(device, dtype, tokens, quantized):
    args = _moe_inputs(tokens, 8, 4, 64, 32, quantized, dtype, device)
    assert_close(triton_ops.moe_experts(*_swizzled(args)), reference.moe_experts(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(3))
def test_moe_random_shapes(device, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 30, (1,), generator=generator))
    experts = int(torch.randint(2, 9, (1,), generator=generator))
    top_k = int(torch.randint(1, experts + 1, (1,), generator=generator))
    args = _moe_inputs(tokens, experts, top_k, 96, 32 * (seed + 1), True, torch.float16, device, bias=seed != 1)
    assert_close(
        triton_ops.moe_experts(*_swizzled(args), alpha=1.5, limit=3.0),
        reference.moe_experts(*args, alpha=1.5, limit=3.0),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_moe_no_tokens(device):
    args = _moe_inputs(0, 4, 2, 64, 32, True, torch.float32, device)
    assert triton_ops.moe_experts(*_swizzled(args)).shape == (0, 64)


def test_shape_mismatches_raise_value_error():
    weight = triton_ops.prepare_weight(mxfp4.quantize(torch.randn(8, 64)))
    with pytest.raises(ValueError, match="does not match MXFP4 weight"):
        triton_ops.linear(torch.randn(2, 32), weight)
    args = _swizzled(_moe_inputs(3, 4, 2, 64, 32, True, torch.float32, "cpu"))
    x, ids, probs, w_gate_up, b_gate_up, w_down, b_down = args
    with pytest.raises(ValueError, match="do not chain"):
        triton_ops.moe_experts(x[:, :32], ids, probs, w_gate_up, b_gate_up, w_down, b_down)
    with pytest.raises(ValueError, match="routing"):
        triton_ops.moe_experts(x, ids[:2], probs[:2], w_gate_up, b_gate_up, w_down, b_down)


def test_unswizzled_mxfp4_is_refused_with_the_fix():
    # One layout in the kernel: a checkpoint-layout weight must be prepared at load, not per call.
    with pytest.raises(TypeError, match="prepare_weight"):
        triton_ops.linear(torch.randn(2, 64), mxfp4.quantize(torch.randn(8, 64)))


@pytest.mark.parametrize("shape", [(3, 40, 2880), (96, 224), (2, 5, 32), (7, 96), (4, 256)])
def test_swizzle_round_trips_and_orders_rows_by_k_block(shape):
    weight = mxfp4.quantize(torch.randn(shape))
    tiles = mxfp4.swizzle(weight)
    back = tiles.unswizzle()
    assert torch.equal(back.blocks, weight.blocks) and torch.equal(back.scales, weight.scales)
    assert tiles.shape == weight.shape and tiles.blocks.numel() == weight.blocks.numel()
    # The first K block (128 wide, 64 bytes a row) holds every row before the next block starts;
    # inside a row, the bytes one MMA thread reads (j, j + 4, j + 8, ...) are adjacent.
    *lead, n, k = shape
    if k >= 128:
        rows = weight.blocks.reshape(*lead, n, k // 2)[..., :64]
        first = tiles.blocks[..., : n * 64].reshape(*lead, n, 64)
        assert torch.equal(first[..., :16], rows[..., 0::4])
        assert torch.equal(first[..., 16:32], rows[..., 1::4])
