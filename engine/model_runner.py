"""Batch -> flat tensors (AttentionMetadata) -> model forward -> logits; owns the paged KV caches."""

from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata
from engine.host_device import upload
from engine.models.base import CausalLM
from engine.request import Sequence

GIB = 1 << 30


def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
    element = torch.empty((), dtype=model.kv_cache_dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


def num_kv_blocks(model: CausalLM, block_size: int, kv_cache_gib: float, gpu_memory_utilization: float) -> int:
    """Blocks that fit the budget: `kv_cache_gib` on CPU, the unreserved share of free GPU memory on CUDA."""
    if model.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model.device)
        budget = free - (1.0 - gpu_memory_utilization) * total
    else:
        budget = kv_cache_gib * GIB
    return int(budget // kv_bytes_per_block(model, block_size))


def _token_slice(seq: Sequence, begin: int, end: int) -> list[int]:
    """`seq.token_ids[begin:end]` without building the whole list (a decode needs one token)."""
    prompt = seq.prompt_token_ids
    if begin >= len(prompt):
        return seq.output_token_ids[begin - len(prompt):end - len(prompt)]
    return prompt[begin:end] + seq.output_token_ids[:max(0, end - len(prompt))]


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.device = model.device
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=model.kv_cache_dtype, device=self.device),
             torch.zeros(shape, dtype=model.kv_cache_dtype, device=self.device))
            for _ in range(model.num_layers)
        ]
        model.bind_kv_caches(self.kv_caches)

    def build_inputs(self, items: list[tuple[Sequence, int]], sample_rows: list[int]
                     ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flat ids/positions and metadata for `(sequence, new tokens)` pairs; logits for `sample_rows` items."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        starts = [0]
        bs = self.block_size
        for seq, count in items:
            begin, end = seq.num_computed_tokens, seq.num_computed_tokens + count
            ids.extend(_token_slice(seq, begin, end))
            positions.extend(range(begin, end))
            if count == 1:
                slots.append(seq.block_ids[begin // bs] * bs + begin % bs)
            else:
                slots.extend(seq.block_ids[p // bs] * bs + p % bs for p in range(begin, end))
            seq_lens.append(end)
            starts.append(starts[-1] + count)
        width = max(len(seq.block_ids) for seq, _ in items)
        flat_tables: list[int] = []
        for seq, _ in items:
            flat_tables += seq.block_ids
            flat_tables += [0] * (width - len(seq.block_ids))
        num_decode = sum(1 for _, count in items if count == 1)
        device = self.device
        metadata = AttentionMetadata(
            slot_mapping=upload(slots, torch.int64, device),
            block_tables=upload(flat_tables, torch.int32, device).view(len(items), width),
            seq_lens=upload(seq_lens, torch.int32, device),
            query_start_loc=upload(starts, torch.int32, device),
            num_prefill_tokens=len(ids) - num_decode,
            num_decode_tokens=num_decode,
            logits_indices=upload([starts[i + 1] - 1 for i in sample_rows], torch.int64, device),
        )
        return upload(ids, torch.int64, device), upload(positions, torch.int64, device), metadata

    @torch.no_grad()  # not inference_mode: the sampler edits the logits in place
    def run(self, items: list[tuple[Sequence, int]], sample_rows: list[int]) -> torch.Tensor:
        """Logits `[len(sample_rows), vocab]` (float32) for the chosen items' last new token."""
        input_ids, positions, metadata = self.build_inputs(items, sample_rows)
        return self.model.forward(input_ids, positions, metadata)
