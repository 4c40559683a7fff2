"""GGUF-quantized weights kept quantized in memory, in the layouts qgemm.cpp reads.

`pack_gguf(raw, type_name, shape)` turns a tensor's stored blocks into a `QuantizedWeight`:
- layout "q4" (Q4_0, Q4_1, Q4_K, MXFP4): 4-bit codes, 16 bytes per group of 32 (low nibble =
  element j, high = element j + 16, GGUF's own order for Q4_0/Q4_1/MXFP4), one fp32 scale per
  group and either one fp32 offset per group (Q4_1; Q4_K's is -dmin * m) or a 16-value codebook
  the codes index (Q4_0: q - 8; MXFP4: the E2M1 values doubled, the scale being 2^(e - 128)).
- layout "q8" (Q8_0, Q6_K): int8 codes, one fp32 scale per group of 32 (Q8_0) or 16 (Q6_K;
  its 6-bit codes are widened to a byte, 8 bits per weight instead of 6.56).
Every value dequantizes to exactly the `gguf` package's float (the per-group products are exact in
fp32; the one rounding left, Q4_1's and Q4_K's `+ offset`, is the one numpy does).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.cpu import extension
from kernels.mxfp4 import MXFP4Tensor

# GGUF type -> (elements per block, bytes per block).
BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210),
          "MXFP4": (32, 17)}
SUPPORTED_TYPES = tuple(BLOCKS)
_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class QuantizedWeight:
    """A `[N, K]` weight (or `[E, N, K]`: experts) kept quantized; see the module docstring for the layouts."""

    layout: str  # "q4" | "q8"
    qs: torch.Tensor  # uint8 [..., N, K/2] (q4) | int8 [..., N, K] (q8)
    scales: torch.Tensor  # fp32 [..., N, K/G]
    offsets: torch.Tensor  # fp32 like scales, or empty
    codebook: torch.Tensor  # fp32 [16] the q4 codes index (Q4_0, MXFP4), or empty
    source_type: str  # the GGUF type it came from (logs, metadata)

    @property
    def shape(self) -> torch.Size:
        k = self.qs.shape[-1] * (2 if self.layout == "q4" else 1)
        return torch.Size((*self.qs.shape[:-1], k))

    @property
    def group(self) -> int:
        """Elements sharing one scale."""
        return self.shape[-1] // self.scales.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.qs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.offsets))

    def select_rows(self, index: torch.Tensor | slice | int) -> "QuantizedWeight":
        """Rows (or experts) `index` of the weight, still packed."""
        offsets = self.offsets[index] if self.offsets.numel() else self.offsets
        return replace(self, qs=self.qs[index], scales=self.scales[index], offsets=offsets)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `ids` (an embedding lookup): only those rows are unpacked."""
        rows = self.select_rows(ids.reshape(-1))
        return rows.dequantize().view(*ids.shape, self.shape[-1])

    def dequantize(self) -> torch.Tensor:
        """fp32 values, exactly as gguf's dequantize gives them."""
        ops = extension.require()
        qs = self.qs.reshape(-1, self.qs.shape[-1])
        scales = self.scales.reshape(-1, self.scales.shape[-1])
        offsets = self.offsets.reshape(-1, self.offsets.shape[-1]) if self.offsets.numel() else _EMPTY
        if self.layout == "q4":
            values = ops.q4_dequantize(qs, scales, offsets, self.codebook)
        else:
            values = ops.q8_dequantize(qs, scales, offsets)
        return values.view(self.shape)


def cat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights stacked along N (fused QKV, gate/up); mixed types are first widened to one layout."""
    if len({(w.layout, tuple(w.codebook.tolist()), w.group, bool(w.offsets.numel())) for w in weights}) > 1:
        weights = _common_layout(weights)
    first = weights[0]
    offsets = torch.cat([w.offsets for w in weights]) if first.offsets.numel() else _EMPTY
    types = "+".join(dict.fromkeys(w.source_type for w in weights))
    return QuantizedWeight(first.layout, torch.cat([w.qs for w in weights]), torch.cat([w.scales for w in weights]),
                           offsets, first.codebook, types)


def _common_layout(weights: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """All as q8 with the smallest group and offsets where any has them: exact, only wider."""
    group = min(w.group for w in weights)
    need_offsets = any(w.offsets.numel() for w in weights)
    return [_as_q8(w, group, need_offsets) for w in weights]


def _as_q8(w: QuantizedWeight, group: int, with_offsets: bool) -> QuantizedWeight:
    if w.layout == "q4":
        low, high = w.qs & 0x0F, w.qs >> 4
        codes = torch.cat((low.view(*low.shape[:-1], -1, 16), high.view(*high.shape[:-1], -1, 16)), -1)
        codes = codes.reshape(*w.qs.shape[:-1], -1)
        qs = (w.codebook[codes.long()] if w.codebook.numel() else codes).to(torch.int8)  # codebooks are integers
    else:
        qs = w.qs
    repeat = w.group // group
    scales = w.scales.repeat_interleave(repeat, dim=-1)
    offsets = w.offsets.repeat_interleave(repeat, dim=-1) if w.offsets.numel() else (
        torch.full_like(scales, -0.0) if with_offsets else _EMPTY)  # v + -0.0 is v, signed zeros included
    return QuantizedWeight("q8", qs.contiguous(), scales, offsets, _EMPTY, w.source_type)


E2M1_X2 = torch.tensor((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=torch.float32)
Q4_0_CODES = torch.arange(-8, 8, dtype=torch.float32)


def pack_gguf(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight:
    """A GGUF tensor's stored bytes (any shape of uint8; `shape` is the logical `[..., N, K]`) packed."""
    per_block, block_bytes = BLOCKS[type_name]
    *lead, k = shape
    if k % per_block:
        raise ValueError(f"{type_name} rows of {k} elements are not whole blocks of {per_block}")
    blocks = raw.reshape(-1, block_bytes)
    return _reshape(_PACKERS[type_name](blocks), tuple(lead))


@dataclass(frozen=True)
class _Packed:
    layout: str
    qs: torch.Tensor  # [blocks, bytes of codes per block]
    scales: torch.Tensor  # [blocks, groups per block]
    offsets: torch.Tensor  # like scales or empty
    codebook: torch.Tensor
    source_type: str


def _reshape(p: _Packed, lead: tuple[int, ...]) -> QuantizedWeight:
    offsets = p.offsets.reshape(*lead, -1).contiguous() if p.offsets.numel() else _EMPTY
    return QuantizedWeight(p.layout, p.qs.reshape(*lead, -1).contiguous(), p.scales.reshape(*lead, -1).contiguous(),
                           offsets, p.codebook, p.source_type)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as fp32 [blocks, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _q4_0(b: torch.Tensor) -> _Packed:
    return _Packed("q4", b[:, 2:], _f16(b, 0), _EMPTY, Q4_0_CODES, "Q4_0")


def _q4_1(b: torch.Tensor) -> _Packed:
    return _Packed("q4", b[:, 4:], _f16(b, 0), _f16(b, 2), _EMPTY, "Q4_1")


def _q8_0(b: torch.Tensor) -> _Packed:
    return _Packed("q8", b[:, 2:].view(torch.int8), _f16(b, 0), _EMPTY, _EMPTY, "Q8_0")


def _mxfp4(b: torch.Tensor) -> _Packed:
    return _Packed("q4", b[:, 1:], _e8m0_half(b[:, :1]), _EMPTY, E2M1_X2, "MXFP4")


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml's e8m0_to_fp32_half: 2^(e - 128), subnormal for e < 2."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _q4_k(b: torch.Tensor) -> _Packed:
    d, dmin = _f16(b, 0), _f16(b, 2)
    s = b[:, 4:16].reshape(-1, 3, 4).to(torch.int32)
    lo, hi, mix = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)), -1).float()  # [blocks, 8]
    mn = torch.cat((hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)), -1).float()
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 elements: low nibbles 0..31, high 32..63
    values = torch.stack((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32)  # [blocks, subblock, element]
    codes = values[..., :16] | (values[..., 16:] << 4)
    return _Packed("q4", codes.reshape(-1, 128), d * sc, -(dmin * mn), _EMPTY, "Q4_K")


def _q6_k(b: torch.Tensor) -> _Packed:
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b, 208)
    low = torch.stack((ql & 0x0F, ql >> 4), dim=2).reshape(-1, 2, 4, 32)  # [blocks, half, quarter, element]
    high = torch.stack([(qh >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=2)  # [blocks, half, quarter, element]
    q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8).reshape(-1, 256)
    return _Packed("q8", q, d * scales, _EMPTY, _EMPTY, "Q6_K")


_PACKERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k, "MXFP4": _mxfp4}


def pack_mxfp4(weight: MXFP4Tensor) -> QuantizedWeight:
    """An HF-layout MXFP4 weight (low nibble = element 2j, scale 2^(e - 127)) in the q4 codebook layout."""
    codes = torch.stack((weight.blocks & 0x0F, weight.blocks >> 4), dim=-1).flatten(-2)  # elements 0..31
    q4 = codes[..., :16] | (codes[..., 16:] << 4)
    lead = weight.scales.shape[:-1]
    return QuantizedWeight("q4", q4.reshape(*lead, -1).contiguous(), _e8m0_half(weight.scales).contiguous(),
                           _EMPTY, E2M1_X2, "MXFP4")
