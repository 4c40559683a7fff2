"""MXFP4 (OCP microscaling FP4) packing in the official gpt-oss checkpoint layout.

A weight `[..., out, in]` is stored as `blocks` uint8 `[..., out, in/32, 16]` (two E2M1
values per byte, low nibble = even element) and `scales` uint8 `[..., out, in/32]`
(E8M0: value = 2^(e - 127)). Dequantization is always done a slice at a time so the
full-precision copy of a whole weight never exists in memory.

`swizzle` rearranges such a weight once, at load, into `SwizzledMXFP4`: the layout the
Triton matmul reads (see its docstring).
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

    def __getitem__(self, index: int | slice | torch.Tensor) -> "MXFP4Tensor":
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


# K elements per swizzled block: the matmul's BLOCK_K (K's remainder takes a block of 64 and/or 32).
TILE_K = 128
# Threads sharing one row of a Hopper MMA operand tile: thread t holds bytes t, t + 4, t + 8, ...
MMA_THREADS_PER_ROW = 4


@dataclass(frozen=True)
class SwizzledMXFP4:
    """An MXFP4 weight `[..., N, K]` in the Triton matmul's layout, made once at load by `swizzle`.

    Per leading index (an expert), K is cut into blocks of `TILE_K` (a remainder of 32, 64 or
    96 into trailing blocks of 64 and/or 32) and each block stores all N rows one after another, so the `BLOCK_N x TILE_K`
    tile the kernel reads is one contiguous run of bytes. Inside a row of a block of W bytes,
    byte j sits at `(j % 4) * (W / 4) + j // 4`: Hopper's MMA operand layout gives thread t
    of a row group bytes t, t + 4, t + 8, ..., which this makes adjacent (one 16-byte load
    instead of sixteen 1-byte ones). Scales follow the same blocks, rows in order
    (`[N, TILE_K / 32]` per block), unpermuted: a thread reads its row's whole run of them.
    `blocks` is `[..., N * K / 2]`, `scales` `[..., N * K / 32]`, both uint8.
    """

    blocks: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def __getitem__(self, index: int) -> "SwizzledMXFP4":
        """One leading index (e.g. one expert)."""
        return SwizzledMXFP4(self.blocks[index], self.scales[index], self.shape[1:])

    def to(self, device: torch.device | str) -> "SwizzledMXFP4":
        return SwizzledMXFP4(self.blocks.to(device), self.scales.to(device), self.shape)

    def unswizzle(self) -> MXFP4Tensor:
        """The checkpoint layout back (tests; the kernels never need it)."""
        *lead, n, k = self.shape
        rows = []
        for start, width in _k_blocks(k):
            offset, size = n * start // 2, n * width // 2
            b = self.blocks[..., offset : offset + size].reshape(*lead, n, MMA_THREADS_PER_ROW, width // 8)
            rows.append(b.transpose(-1, -2).reshape(*lead, n, width // 2))
        blocks = torch.cat(rows, dim=-1).reshape(*lead, n, k // BLOCK, BLOCK // 2)
        scales = torch.cat(
            [self.scales[..., n * s // BLOCK : n * (s + w) // BLOCK].reshape(*lead, n, w // BLOCK) for s, w in _k_blocks(k)],
            dim=-1,
        )
        return MXFP4Tensor(blocks.contiguous(), scales.contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.unswizzle().dequantize(dtype)


def _k_blocks(k: int) -> list[tuple[int, int]]:
    """(first K element, width) of each swizzled block: full `TILE_K` blocks, then 64 and/or 32 for the rest."""
    blocks = [(start, TILE_K) for start in range(0, k - k % TILE_K, TILE_K)]
    start = k - k % TILE_K
    for width in (TILE_K // 2, TILE_K // 4):
        if (k - start) >= width:
            blocks.append((start, width))
            start += width
    return blocks


def swizzle(weight: MXFP4Tensor) -> SwizzledMXFP4:
    """`weight` rearranged into the matmul's tile layout (a copy; see `SwizzledMXFP4`)."""
    *lead, n, k = weight.shape
    blocks = weight.blocks.reshape(*lead, n, k // 2)
    b_parts, s_parts = [], []
    for start, width in _k_blocks(k):
        b = blocks[..., start // 2 : (start + width) // 2].reshape(*lead, n, width // 8, MMA_THREADS_PER_ROW)
        b_parts.append(b.transpose(-1, -2).reshape(*lead, n * width // 2))
        s_parts.append(weight.scales[..., start // BLOCK : (start + width) // BLOCK].reshape(*lead, n * width // BLOCK))
    return SwizzledMXFP4(
        torch.cat(b_parts, dim=-1).contiguous(), torch.cat(s_parts, dim=-1).contiguous(), weight.shape
    )
