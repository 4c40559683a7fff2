"""Device dispatches of one gpt-oss decode layer, counted on any machine with the kernels stubbed.

Launch overhead, not bandwidth, bounds a small-batch decode step once the kernels are
fast: even replayed from a CUDA graph each launch costs ~2 us. This counts what one
decoder layer (input norm with the residual add, attention, post-attention norm, MoE)
issues through the Triton ops: every Triton launch (stubbed: nothing runs, its outputs
stay uninitialised) and every aten op that does device work, seen by a dispatch mode.
Views and bare allocations (`empty`, `empty_strided`) launch nothing and are not counted.
Attention is counted in its split-K decode form, as the GPU runs it (split + merge).

    python -m bench.launches
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Allocations without a kernel behind them.
_NO_KERNEL = {"empty.memory_format", "empty_strided.default", "empty_like.default"}

# A small gpt-oss with gpt-oss-20b's routing (top-4 of 32), the only sizes that can change the count.
SMALL_GPT_OSS = dict(hidden=64, heads=8, kv_heads=2, head_dim=16, experts=32, top_k=4, inter=64, vocab=96, window=8)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: object, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = func.__name__  # e.g. "addmm.default"
        if not func.is_view and name not in _NO_KERNEL:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_dispatches() -> Iterator[Counter[str]]:
    """Count Triton launches (stubbed) and kernel-launching aten ops inside the block."""
    from triton.runtime.jit import KernelInterface

    counts: Counter[str] = Counter()

    def stub_launch(kernel: Any, grid: object) -> Callable[..., None]:
        def launch(*args: object, **kwargs: object) -> None:
            counts[f"triton.{getattr(kernel, 'fn', kernel).__name__}"] += 1

        return launch

    with mock.patch.object(KernelInterface, "__getitem__", stub_launch), _AtenCounter(counts):
        yield counts


def count(fn: Callable[[], object]) -> Counter[str]:
    with counting_dispatches() as counts:
        fn()
    return counts


def gpt_oss_decode_layer(batch: int = 8, context: int = 40) -> Counter[str]:
    """Dispatches of one (non-first) gpt-oss decoder layer in a decode step through `kernels.triton_ops`:
    the forward of a 3-layer model minus that of its first 2 layers."""
    from bench.gpu_suite import gpt_oss_config, random_gpt_oss_model
    from engine.attention_metadata import AttentionMetadata
    from kernels import triton_ops
    from kernels.triton import attention

    config = gpt_oss_config(layers=3, **SMALL_GPT_OSS)
    model = random_gpt_oss_model(config, "cpu", triton_ops)
    block_size = 16
    blocks_per_seq = -(-(context + 1) // block_size)
    shape = (batch * blocks_per_seq, block_size, model.num_kv_heads, model.head_dim)
    caches = [(torch.zeros(shape, dtype=model.kv_cache_dtype), torch.zeros(shape, dtype=model.kv_cache_dtype))]
    tables = torch.arange(shape[0], dtype=torch.int32).view(batch, blocks_per_seq)
    meta = AttentionMetadata(
        slot_mapping=tables[:, context // block_size].long() * block_size + context % block_size,
        block_tables=tables,
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        num_decode_tokens=batch,
    )
    ids = torch.randint(0, config["vocab_size"], (batch,))
    positions = torch.full((batch,), context)
    layers = model.layers

    def forward(num_layers: int) -> Counter[str]:
        model.layers, model.num_layers = layers[:num_layers], num_layers
        model.bind_kv_caches(caches * num_layers)
        return count(lambda: model.forward(ids, positions, meta))

    with mock.patch.object(attention, "_num_splits", lambda programs, device: 8):
        counts = forward(3)
        counts.subtract(forward(2))
    return +counts


def summary(counts: Counter[str]) -> str:
    triton_launches = sum(n for name, n in counts.items() if name.startswith("triton."))
    aten_ops = sum(counts.values()) - triton_launches
    detail = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(counts.items()))
    return (
        f"gpt-oss decode layer: {triton_launches + aten_ops} device dispatches "
        f"({triton_launches} Triton launches + {aten_ops} aten ops): {detail}"
    )


if __name__ == "__main__":
    print(summary(gpt_oss_decode_layer()))
