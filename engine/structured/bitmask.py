"""Token bitmasks in xgrammar's layout: int32 `[rows, ceil(vocab / 32)]`, bit j of word i allows token 32*i + j.

A row of all ones (-1) allows everything. The sampler applies it (engine.sampler.apply_token_bitmask).
"""

from __future__ import annotations

import torch


def words_for(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def unconstrained_bitmask(rows: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.full((rows, words_for(vocab_size)), -1, dtype=torch.int32, device=device)

