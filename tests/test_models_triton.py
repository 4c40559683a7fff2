"""The models on the Triton kernels (kernels.triton_ops): the CPU interpreter here, CUDA on a GPU.

Same references as tests/test_models.py (transformers on the same weights); this checks the
seam: every op the models call exists in the Triton namespace with the same contract.
"""

from __future__ import annotations

import pytest
from kernel_testing import DEVICES, interpreter  # noqa: F401  (TRITON_INTERPRET=1 on CPU)

from engine.loader import open_model
from engine.models import build_model
from kernels import select_ops
from model_factories import save_tiny_gpt_oss_mxfp4, save_tiny_model
from test_models import FP32_TOL, PagedBatcher, check_prefill_then_decode, prompts, reference_logits, rel_err


@pytest.mark.parametrize("device", DEVICES)
def test_gpt_oss_mxfp4_prefill_and_decode_on_triton(tmp_path, device):
    hf = save_tiny_gpt_oss_mxfp4(tmp_path, seed=6)
    model = build_model(open_model(tmp_path), device=device, ops=select_ops(device, "triton"))
    check_prefill_then_decode(model, hf, (9, 8), FP32_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_phi3_flat_prefill_on_triton(tmp_path, device):
    hf = save_tiny_model("phi3", tmp_path)
    model = build_model(open_model(tmp_path), device=device, ops=select_ops(device, "triton"))
    batch = prompts((6, 9), seed=3)
    for tokens, logits in zip(batch, PagedBatcher(model, block_size=4).step(dict(enumerate(batch)))):
        assert rel_err(logits, reference_logits(hf, tokens)) < FP32_TOL
