"""Rank 0 -> every rank: one forward step's flat inputs as two broadcasts (a header, then one int64 tensor).

The other ranks run the same forward on the same ids, positions and paged-KV metadata; only the
KV-cache slices and weight slices differ. A header whose first field is STOP ends a worker.
"""

from __future__ import annotations

import torch

from engine.attention_metadata import AttentionMetadata

STEP, STOP, KV_CACHE = 1, 0, 2
_HEADER = 8  # command, tokens, sequences, table width, logits rows (-1 = every token), prefill, decode, spare


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.broadcast(tensor, src=0)
    return tensor


def send_command(command: int, *fields: int, device: torch.device) -> None:
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    header[0] = command
    header[1:1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    _broadcast(header)


def send_step(input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
    device = input_ids.device
    logits = meta.logits_indices
    send_command(STEP, input_ids.numel(), meta.num_seqs, meta.block_tables.shape[1],
                 -1 if logits is None else logits.numel(), meta.num_prefill_tokens, meta.num_decode_tokens,
                 device=device)
    parts = [input_ids, positions, meta.slot_mapping, meta.block_tables.flatten(), meta.seq_lens,
             meta.query_start_loc] + ([] if logits is None else [logits])
    _broadcast(torch.cat([p.to(device=device, dtype=torch.int64) for p in parts]))


def receive(device: torch.device) -> tuple[int, list[int]]:
    """The next command and its integer fields."""
    header = _broadcast(torch.empty(_HEADER, dtype=torch.int64, device=device)).tolist()
    return header[0], header[1:]


def receive_step(fields: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    tokens, seqs, width, logits, prefill, decode = fields[:6]
    sizes = [tokens, tokens, tokens, seqs * width, seqs, seqs + 1, max(logits, 0)]
    flat = _broadcast(torch.empty(sum(sizes), dtype=torch.int64, device=device))
    ids, positions, slots, tables, seq_lens, starts, rows = flat.split(sizes)
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.view(seqs, width).to(torch.int32),
        seq_lens=seq_lens.to(torch.int32),
        query_start_loc=starts.to(torch.int32),
        num_prefill_tokens=prefill,
        num_decode_tokens=decode,
        logits_indices=None if logits < 0 else rows,
    )
    return ids, positions, meta
