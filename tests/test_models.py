"""Model forward passes against transformers (tiny random configs built offline), through the paged cache.

References: transformers' own model classes run on the same weights (eager attention), and the
gguf package for GGUF files. fp32 tolerance: max |diff| / max |ref| < 1e-4; bf16: < 2e-2.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.loader import open_model
from engine.models import build_model
from kernels.cpu.quant import QuantizedWeight
from kernels.mxfp4 import MXFP4Tensor
from model_factories import KINDS, save_tiny_gpt_oss_mxfp4, save_tiny_model

transformers = pytest.importorskip("transformers")

FP32_TOL, BF16_TOL = 1e-4, 2e-2


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.float().cpu(), ref.float().cpu()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


class PagedBatcher:
    """Drives a model like the engine: flat batches over a paged cache with shuffled block tables."""

    def __init__(self, model, block_size: int, num_blocks: int = 64, seed: int = 0) -> None:
        self.model, self.block_size = model, block_size
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        cache = dict(dtype=model.kv_cache_dtype, device=model.device)
        model.bind_kv_caches([(torch.zeros(shape, **cache), torch.zeros(shape, **cache)) for _ in model.layers])
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]], last_only: bool = False) -> list[torch.Tensor]:
        """Run new tokens for several sequences in one flat batch; logits per sequence."""
        ids, positions, slots, starts, seq_lens = [], [], [], [0], []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.blocks.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for pos in range(start, end):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            ids += tokens
            positions += range(start, end)
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.blocks[s]) for s in chunks)
        tables = [self.blocks[s] + [0] * (width - len(self.blocks[s])) for s in chunks]
        on = dict(device=self.model.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **on),
            block_tables=torch.tensor(tables, dtype=torch.int32, **on),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, **on),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, **on),
            logits_indices=torch.tensor(starts[1:], **on) - 1 if last_only else None,
        )
        logits = self.model.forward(torch.tensor(ids, **on), torch.tensor(positions, **on), meta)
        if last_only:
            return list(logits)
        return [logits[starts[i] : starts[i + 1]] for i in range(len(chunks))]


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def prompts(lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: (root / kind, save_tiny_model(kind, root / kind)) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_flat_prefill_matches_transformers(saved, kind):
    path, hf = saved[kind]
    model = build_model(open_model(path), dtype=torch.float32)
    batch = prompts((5, 13, 8))
    out = PagedBatcher(model, block_size=4).step(dict(enumerate(batch)))
    for tokens, logits in zip(batch, out):
        assert rel_err(logits, reference_logits(hf, tokens)) < FP32_TOL


@pytest.mark.parametrize("kind", ["mistral", "gpt_oss", "phi3", "llama3"])
def test_prefill_then_decode_matches_full_forward(saved, kind):
    """Chunked prefill and token-by-token decode past the sliding window, block size 3, two sequences
    interleaved in each batch, logits only for last tokens."""
    path, hf = saved[kind]
    check_prefill_then_decode(build_model(open_model(path)), hf, (17, 14), FP32_TOL)


def check_prefill_then_decode(model, hf, lengths: tuple[int, int], tol: float) -> None:
    """Prefill chunks of 4 and 6 tokens, then decode both sequences a token per step in one batch."""
    seqs = prompts(lengths, seed=2)
    batcher = PagedBatcher(model, block_size=3, seed=5)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for seq, logits in enumerate(batcher.step({0: seqs[0][:4], 1: seqs[1][:6]}, last_only=True)):
        got[seq].append(logits)
    fed = {0: 4, 1: 6}
    while any(fed[s] < len(seqs[s]) for s in fed):
        chunk = {s: seqs[s][fed[s] : fed[s] + 1] for s in fed if fed[s] < len(seqs[s])}
        for seq, logits in zip(chunk, batcher.step(chunk, last_only=True)):
            got[seq].append(logits)
            fed[seq] += 1
    for seq, tokens in enumerate(seqs):
        ref = reference_logits(hf, tokens)[fed[seq] - len(got[seq]) :]
        assert rel_err(torch.stack(got[seq]), ref) < tol


def test_sliding_window_changes_logits(saved):
    """The decode test above would be vacuous if the window never mattered at these lengths."""
    path, hf = saved["mistral"]
    tokens = prompts((14,))[0]
    windowed = reference_logits(hf, tokens)
    hf.config.sliding_window = None
    try:
        full = reference_logits(hf, tokens)
    finally:
        hf.config.sliding_window = 6
    assert rel_err(windowed[-1:], full[-1:]) > 1e-3
    model = build_model(open_model(path))
    assert model.layers[0].attention.sliding_window == 6


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_oss"])
def test_bf16_matches_transformers(tmp_path, kind):
    """bf16 against transformers in bf16. Weights std 0.1: at 0.2 both sides drift ~3% from fp32."""
    hf = save_tiny_model(kind, tmp_path, weight_std=0.1).to(torch.bfloat16)
    model = build_model(open_model(tmp_path), dtype=torch.bfloat16)
    assert model.embed.dtype == torch.bfloat16 and model.kv_cache_dtype == torch.bfloat16
    batch = prompts((6, 9), seed=3)
    out = PagedBatcher(model, block_size=5).step(dict(enumerate(batch)))
    for tokens, logits in zip(batch, out):
        assert rel_err(logits, reference_logits(hf, tokens)) < BF16_TOL


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return path, save_tiny_gpt_oss_mxfp4(path, seed=3)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked-once-on-cpu"])
def test_gpt_oss_mxfp4_experts_match_transformers_packed_or_unpacked(mxfp4_checkpoint, packed):
    """Packed MXFP4 experts (the default; on CPU read by the quantized kernels where the plan keeps MXFP4),
    or dense copies made once at load (the CPU engine's choice)."""
    path, hf = mxfp4_checkpoint
    model = build_model(open_model(path), unpack_mxfp4_gib=0.0 if packed else 1.0)
    moe = model.layers[0].mlp
    packed_types = (MXFP4Tensor, QuantizedWeight)
    assert isinstance(moe.gate_up, packed_types) == packed and isinstance(moe.down, packed_types) == packed
    batch = prompts((7, 12), seed=4)
    out = PagedBatcher(model, block_size=4).step(dict(enumerate(batch)))
    # transformers' own MXFP4 integration dequantizes the checkpoint: checks the on-disk layout too.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), attn_implementation="eager"
    ).float()
    for tokens, logits in zip(batch, out):
        assert rel_err(logits, reference_logits(hf, tokens)) < FP32_TOL
        assert rel_err(logits, reference_logits(loaded, tokens)) < FP32_TOL
