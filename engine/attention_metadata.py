"""What one forward step needs to know about the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Paged-KV description of a flat batch of tokens from many sequences.

    Sequence i's new tokens are `input_ids[query_start_loc[i]:query_start_loc[i+1]]`;
    they are the last tokens of its `seq_lens[i]`-token context, whose keys and
    values live in the blocks `block_tables[i, :ceil(seq_lens[i] / block_size)]`.
    A decode is a sequence with one new token; prefills (or prefill chunks) have more.
    """

    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each new token, -1 = padding
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including the new tokens
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]: prefix sums of new-token counts
    num_prefill_tokens: int = 0  # counts only; sequences may come in any order
    num_decode_tokens: int = 0
    # Rows of the flat batch to compute logits for (usually each sequence's last
    # token); None means every token.
    logits_indices: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    def without_last(self, num_rows: int) -> AttentionMetadata:
        """The batch less its last sequence (`num_rows` new tokens): for the layers a split prompt chunk does not
        run this step (engine/models/decoder.py, `forward_span`)."""
        num_tokens, num_seqs = self.slot_mapping.shape[0] - num_rows, self.num_seqs - 1
        last_is_decode = num_rows == 1
        return AttentionMetadata(self.slot_mapping[:num_tokens], self.block_tables[:num_seqs], self.seq_lens[:num_seqs],
                                 self.query_start_loc[:num_seqs + 1],
                                 self.num_prefill_tokens - (0 if last_is_decode else num_rows),
                                 self.num_decode_tokens - (1 if last_is_decode else 0))
