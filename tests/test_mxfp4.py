"""MXFP4 packing against the gguf package's independent implementation."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from kernels.mxfp4 import FP4_VALUES, MXFP4Tensor, dequantize, quantize


def _to_gguf_blocks(t: MXFP4Tensor) -> np.ndarray:
    """Repack HF order (low nibble = 2j, high = 2j+1) into GGUF's 17-byte blocks
    (scale, then low nibble = j, high nibble = j + 16)."""
    codes = torch.stack((t.blocks & 0x0F, t.blocks >> 4), dim=-1).flatten(-2)  # [..., n, 32]
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat((t.scales.unsqueeze(-1), packed), dim=-1).numpy()


@pytest.mark.parametrize("shape", [(4, 64), (3, 5, 96)])
def test_dequantize_matches_gguf(shape):
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[-1])
    q = quantize(w)
    ours = q.dequantize()
    gguf_vals = quants.dequantize(_to_gguf_blocks(q).reshape(*shape[:-1], -1), GGMLQuantizationType.MXFP4)
    assert torch.equal(ours, torch.from_numpy(np.asarray(gguf_vals, dtype=np.float32)))


def test_every_byte_and_scale_matches_gguf():
    """All 256 packed bytes under every finite E8M0 scale (2^-127 ... 2^127), subnormals included."""
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).repeat(255, 1, 1)  # [255 scales, 16 blocks, 16]
    scales = torch.arange(255, dtype=torch.uint8).view(255, 1).expand(255, 16).contiguous()
    q = MXFP4Tensor(blocks, scales)
    with np.errstate(over="ignore"):  # 6 x 2^127 overflows to inf, on both sides
        gguf_vals = quants.dequantize(_to_gguf_blocks(q).reshape(255, -1), GGMLQuantizationType.MXFP4)
    assert torch.equal(q.dequantize(), torch.from_numpy(np.asarray(gguf_vals, dtype=np.float32)))


def test_quantize_is_nearest_grid_point():
    w = torch.randn(8, 64)
    q = quantize(w)
    deq = q.dequantize()
    scale = torch.exp2(q.scales.float() - 127).repeat_interleave(32, dim=-1)
    grid = torch.tensor(FP4_VALUES).unique()
    best = (w.unsqueeze(-1) - grid * scale.unsqueeze(-1)).abs().min(dim=-1).values
    assert torch.allclose((w - deq).abs(), best, atol=1e-6)
    assert q.shape == w.shape


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 33))
    with pytest.raises(ValueError):
        MXFP4Tensor(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
    assert dequantize(torch.zeros(1, 16, dtype=torch.uint8), torch.full((1,), 127, dtype=torch.uint8)).shape == (32,)
