"""Rotary embedding frequencies: plain, linear, llama3 and YaRN scaling, all as one `inv_freq` + `mscale`.

The ops namespace applies the rotation (`ops.rope`); scaling methods only change the
frequencies (and, for YaRN, a cos/sin multiplier), as in transformers' modeling_rope_utils.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Rotary:
    """What `ops.rope` needs: `inv_freq` (rotary_dim / 2 entries, fp32) and the cos/sin scale."""

    inv_freq: torch.Tensor
    mscale: float = 1.0

    def to(self, device: torch.device) -> "Rotary":
        return Rotary(self.inv_freq.to(device), self.mscale)


def base_inv_freq(theta: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def build_rotary(params: dict[str, Any], rotary_dim: int, max_positions: int) -> Rotary:
    """`params` is transformers' `rope_parameters` dict (rope_theta, rope_type and its own keys)."""
    theta = float(params["rope_theta"])
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    inv_freq = base_inv_freq(theta, rotary_dim)
    if rope_type == "default":
        return Rotary(inv_freq)
    if rope_type == "linear":
        return Rotary(inv_freq / float(params["factor"]))
    if rope_type == "llama3":
        return Rotary(_llama3(inv_freq, params))
    if rope_type == "yarn":
        return _yarn(theta, rotary_dim, params, max_positions)
    raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, blended, scaled)


def _yarn(theta: float, dim: int, params: dict[str, Any], max_positions: int) -> Rotary:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin by `attention_factor`."""
    original = int(params["original_max_position_embeddings"])
    factor = params.get("factor") or max_positions / original
    factor = float(factor)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = get_mscale(factor, m) / get_mscale(factor, m_all) if m and m_all else get_mscale(factor)
    beta_fast = float(params.get("beta_fast") or 32)
    beta_slow = float(params.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = base_inv_freq(theta, dim)
    interpolation = extrapolation / factor
    keep = 1 - ramp
    return Rotary(interpolation * (1 - keep) + extrapolation * keep, float(attention_factor))
