"""Whole models: logits with the Triton kernels equal logits with the torch reference ops.

Tiny random checkpoints (tests/model_factories.py: transformers configs saved offline) are
built twice through engine.models.build_model, once per op set, and driven like the engine:
a flat batch prefilling two sequences of different lengths, then decode steps for both.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention_metadata import AttentionMetadata
from engine.loader import open_model
from engine.models import build_model
from kernel_testing import DEVICES, interpreter, poisoned_outputs  # noqa: F401
from kernels import reference, triton_ops
from kernels.mxfp4 import MXFP4Tensor, SwizzledMXFP4
from model_factories import save_tiny_gpt_oss_mxfp4, save_tiny_model

BLOCK_SIZE = 16


def _run(model, device: str, prompts: list[list[int]], decode_steps: int) -> list[torch.Tensor]:
    """Prefill every prompt in one flat batch, then greedy-free decode (fixed next tokens)."""
    num_blocks = 8
    shape = (num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    model.bind_kv_caches(
        [(torch.zeros(shape, dtype=model.kv_cache_dtype, device=device),
          torch.zeros(shape, dtype=model.kv_cache_dtype, device=device)) for _ in range(model.num_layers)]
    )  # fmt: skip
    tables = torch.tensor([[2 * i + 1, 2 * i] for i in range(len(prompts))], dtype=torch.int32, device=device)
    lengths = [0] * len(prompts)
    chunks = prompts
    outputs = []
    for step in range(decode_steps + 1):
        ids, positions, slots, starts = [], [], [], [0]
        for i, chunk in enumerate(chunks):
            for pos in range(lengths[i], lengths[i] + len(chunk)):
                slots.append(int(tables[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
                positions.append(pos)
            ids += chunk
            lengths[i] += len(chunk)
            starts.append(starts[-1] + len(chunk))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=device),
            block_tables=tables,
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        )
        outputs.append(model.forward(torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta))
        chunks = [[(7 * step + 11 * i) % 250 + 3] for i in range(len(prompts))]
    return outputs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_models")
    save_tiny_gpt_oss_mxfp4(root / "gpt_oss_mxfp4")
    for kind in ("llama3", "phi3"):
        save_tiny_model(kind, root / kind)
    return root


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gpt_oss_mxfp4", "llama3", "phi3"])
def test_triton_logits_equal_torch_logits(checkpoints, device, kind):
    """fp32: Triton and torch logits agree to 1e-4. bf16: both differ from the fp32 logits by
    rounding; the Triton path may not lose more than twice what the torch path loses."""
    prompts = [[5, 17, 99, 3, 42, 8, 200], [9, 1, 250, 77]]
    runs = {}
    for name, ops, dtype in (
        ("torch fp32", reference, torch.float32), ("triton fp32", triton_ops, torch.float32),
        ("torch bf16", reference, torch.bfloat16), ("triton bf16", triton_ops, torch.bfloat16),
    ):  # fmt: skip
        model = build_model(open_model(checkpoints / kind), device=device, dtype=dtype, ops=ops)
        runs[name] = _run(model, device, prompts, decode_steps=1)
    for step, truth in enumerate(runs["torch fp32"]):
        assert _rel(runs["triton fp32"][step], truth) < 1e-4, f"{kind} fp32 step {step}"
        torch_loss = _rel(runs["torch bf16"][step], truth)
        triton_loss = _rel(runs["triton bf16"][step], truth)
        assert triton_loss < max(2 * torch_loss, 1e-2), f"{kind} bf16 step {step}: {triton_loss:.3g} vs {torch_loss:.3g}"


def test_gpt_oss_experts_are_swizzled_once_at_load_for_triton(checkpoints):
    """The Triton backend's model holds its MXFP4 experts in the matmul's tile layout, made at load from
    the same bytes the torch backend keeps in the checkpoint's layout."""
    torch_model = build_model(open_model(checkpoints / "gpt_oss_mxfp4"), device="cpu", ops=reference)
    triton_model = build_model(open_model(checkpoints / "gpt_oss_mxfp4"), device="cpu", ops=triton_ops)
    for ours, theirs in zip(triton_model.layers, torch_model.layers):
        for name in ("gate_up", "down"):
            swizzled, packed = getattr(ours.mlp, name), getattr(theirs.mlp, name)
            assert isinstance(swizzled, SwizzledMXFP4) and isinstance(packed, MXFP4Tensor)
            back = swizzled.unswizzle()
            assert torch.equal(back.blocks, packed.blocks) and torch.equal(back.scales, packed.scales)
