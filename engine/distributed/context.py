"""ParallelContext: which slice of the model this process holds, and the collectives that join the slices."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from kernels.cpu.quant import QuantizedWeight


@dataclass
class ParallelContext:
    """Rank `rank` of a `world_size`-rank tensor-parallel group; `world_size == 1` runs no collective.

    The model calls the three collectives below at the only places where slices meet: after each
    row-parallel projection (attention output, MLP/MoE down), after the vocab-parallel embedding,
    and to join the vocab-parallel logits. `counts` tallies every collective run (tests, benchmarks).
    """

    rank: int = 0
    world_size: int = 1
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place (the partial sums of a row-parallel matmul)."""
        if self.is_parallel:
            import torch.distributed as dist

            dist.all_reduce(tensor)
            self.counts["all_reduce"] += 1
        return tensor

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """This rank's rows of the embedding / LM head: equal slices of ceil(vocab / ranks), the last shorter."""
        per_rank = -(-vocab_size // self.world_size)
        return min(self.rank * per_rank, vocab_size), min((self.rank + 1) * per_rank, vocab_size)

    def embed(self, table: torch.Tensor | QuantizedWeight, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Rows of the vocab-parallel `table` for `ids`: each rank fills the ids it holds, zeros elsewhere, summed."""
        if not self.is_parallel:
            return table[ids]
        begin, end = self.vocab_range(vocab_size)
        mine = (ids >= begin) & (ids < end)
        rows = table[(ids - begin).clamp(0, max(end - begin - 1, 0))]
        rows = rows * mine.unsqueeze(-1).to(rows.dtype)
        return self.all_reduce(rows)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """`[T, vocab]` logits from every rank's `[T, its vocab slice]`."""
        if not self.is_parallel:
            return logits
        import torch.distributed as dist

        per_rank = -(-vocab_size // self.world_size)
        padded = torch.nn.functional.pad(logits, (0, per_rank - logits.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        self.counts["all_gather"] += 1
        return torch.cat(parts, dim=-1)[:, :vocab_size]


SINGLE = ParallelContext()  # the whole model in one process
