"""MXFP4 (OCP microscaling FP4) packing in the official gpt-oss checkpoint layout.

A weight `[..., out, in]` is stored as `blocks` uint8 `[..., out, in/32, 16]` (two E2M1
values per byte, low nibble = even element) and `scales` uint8 `[..., out, in/32]`
(E8M0: value = 2^(e - 127)). Dequantization is always done a slice at a time so the
full-precision copy of a whole weight never exists in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class MXFP4Tensor:
    """A packed MXFP4 weight; `shape` is the logical `[..., out, in]` shape."""

    blocks: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.blocks.dtype != torch.uint8 or self.scales.dtype != torch.uint8:
            raise ValueError("MXFP4 blocks and scales must be uint8")
        if self.blocks.shape[-1] != BLOCK // 2 or self.blocks.shape[:-1] != self.scales.shape:
            raise ValueError(
                f"MXFP4 blocks {tuple(self.blocks.shape)} do not match scales {tuple(self.scales.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.scales.shape[:-1], self.scales.shape[-1] * BLOCK))

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def __getitem__(self, index) -> "MXFP4Tensor":
        """Index leading dims (e.g. one expert) without unpacking."""
        return MXFP4Tensor(self.blocks[index], self.scales[index])

    def to(self, device: torch.device | str) -> "MXFP4Tensor":
        return MXFP4Tensor(self.blocks.to(device), self.scales.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.scales, dtype)


def _pair_table(device: torch.device) -> torch.Tensor:
    """Byte -> (low-nibble value, high-nibble value): one lookup unpacks two elements."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    return torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1)


def _scale_table(device: torch.device) -> torch.Tensor:
    """E8M0 byte e -> 2^(e - 127), exact in float32 (2^-127 is a subnormal; 255, NaN in the spec, gives inf)."""
    return torch.ldexp(torch.ones(256, device=device), torch.arange(256, device=device, dtype=torch.float32) - 127)


_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack `[..., n, 16]` blocks and `[..., n]` scales to `[..., n * 32]` values (table lookups)."""
    if blocks.device not in _TABLES:
        _TABLES[blocks.device] = (_pair_table(blocks.device), _scale_table(blocks.device))
    pairs, powers = _TABLES[blocks.device]
    values = pairs.index_select(0, blocks.reshape(-1).int()).view(*blocks.shape[:-1], BLOCK)
    factors = powers.index_select(0, scales.reshape(-1).int()).view(*scales.shape, 1)
    return (values * factors).flatten(-2).to(dtype)


def quantize(weight: torch.Tensor) -> MXFP4Tensor:
    """Round `[..., out, in]` (in divisible by 32) to MXFP4, nearest E2M1 value per element.

    The shared scale is the smallest power of two that maps the block's absolute
    maximum inside E2M1's range (6.0), so no element clips.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs the last dim divisible by {BLOCK}, got {weight.shape[-1]}")
    w = weight.detach().to(torch.float32).reshape(*weight.shape[:-1], -1, BLOCK)
    amax = w.abs().amax(dim=-1)
    exponent = torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / 6.0)).clamp(-127, 127)
    scaled = w / torch.exp2(exponent).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)
    codes = codes | ((scaled < 0) & (codes > 0)).to(codes.dtype) << 3
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return MXFP4Tensor(blocks.contiguous(), scales.contiguous())
