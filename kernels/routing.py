"""The MoE routing contract: which rows each expert multiplies, in what order, in which row tiles.

`kernels.triton.routing` builds all of it in one launch on the device; `route` here is
its plain-torch reference (and the yardstick of its tests). The grouped matmul reads:

- `row_pair[r]`, `row_weight[r]`: (token, slot) pair `token * k + slot` and routing
  weight of sorted row r. Rows are grouped by expert (ascending id); inside an expert
  they keep pair order, so the layout is deterministic.
- `tile_expert[j]`, `tile_start[j]`: expert and first sorted row of row tile j of
  `block_m` rows; a tile ends at `expert_end[tile_expert[j]]` or after `block_m` rows.
  The tile count is fixed by the shapes (`max_tiles`), so nothing is read back to the
  host and the whole MoE can be captured in a CUDA graph; tiles past the used ones
  have expert id `num_experts` and do nothing.

Top-k ties go to the lower expert id; the k weights are a softmax over the k chosen logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    expert_ids: torch.Tensor  # int32 [T, k]: chosen experts, highest logit first
    expert_weights: torch.Tensor  # fp32 [T, k]: softmax over the chosen logits
    row_pair: torch.Tensor  # int32 [T * k]: token * k + slot of each expert-sorted row
    row_weight: torch.Tensor  # fp32 [T * k]: routing weight of each expert-sorted row
    tile_expert: torch.Tensor  # int32 [max_tiles]: expert of each row tile (num_experts = unused)
    tile_start: torch.Tensor  # int32 [max_tiles]: first sorted row of each used tile
    expert_end: torch.Tensor  # int32 [E]: one past each expert's last sorted row


def max_tiles(pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on row tiles: every expert adds at most one partly filled tile."""
    return pairs // block_m + min(num_experts, pairs)


def top_k(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax over the k largest logits, their expert ids as int64); ties go to the lower id."""
    values, ids = torch.sort(router_logits.float(), dim=-1, descending=True, stable=True)
    return torch.softmax(values[:, :k], dim=-1), ids[:, :k]


def route(
    expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int, block_m: int
) -> Routing:
    """The routing layout for chosen `[T, k]` experts and weights (see the module docstring)."""
    tokens, k = expert_ids.shape
    pairs = tokens * k
    device = expert_ids.device
    flat = expert_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    expert_end = torch.cumsum(counts, 0)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_ids = torch.arange(max_tiles(pairs, num_experts, block_m), device=device)
    tile_expert = torch.searchsorted(tile_end, tile_ids, right=True)
    used = tile_expert.clamp(max=num_experts - 1)
    first_tile = tile_end[used] - tiles[used]
    tile_start = torch.where(
        tile_expert < num_experts, expert_end[used] - counts[used] + (tile_ids - first_tile) * block_m, 0
    )
    return Routing(
        expert_ids=expert_ids.to(torch.int32),
        expert_weights=expert_weights.float(),
        row_pair=order.to(torch.int32),
        row_weight=expert_weights.reshape(-1).float()[order],
        tile_expert=tile_expert.to(torch.int32),
        tile_start=tile_start.to(torch.int32),
        expert_end=expert_end.to(torch.int32),
    )
