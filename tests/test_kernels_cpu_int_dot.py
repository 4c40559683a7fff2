"""The integer dot-product CPU matmuls (kernels/cpu/qgemm_int.cpp) against torch, and their fallback.

The reference rounds x as the kernels document (int16 per block of 32: scale = max|x| / 32767, round
half to even), then multiplies the rounded x by the `gguf` package's dequantized weight in float64: the
kernels' integer sums are exact, so the only difference left is fp32 rounding of the per-group
scaling and the final sum (relative error <= 1e-5 of the output's scale).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kernels import cpu_ops
from kernels.cpu import extension, select
from kernels.cpu.quant import BLOCKS, cat_rows, pack_gguf
from test_kernels_cpu_quant import random_blocks, reference_values


@pytest.fixture(scope="module")
def int_kernels():
    ops = extension.load()
    if ops is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    if not ops.has_int_dot():
        pytest.skip("this CPU has no AVX512BW: the integer kernels are not built (the fallback is tested below)")


def rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels see it: int16 codes per block of 32 times the block's scale."""
    blocks = x.view(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 32767
    inverse = torch.where(scale != 0, 1 / scale, torch.zeros_like(scale))
    return (torch.round(blocks * inverse) * scale).view_as(x)


def assert_matches_reference(got: torch.Tensor, x: torch.Tensor, values: torch.Tensor) -> None:
    expected = rounded_activations(x).double() @ values.double().T
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
@pytest.mark.parametrize("rows,k,m", [(37, 256, 1), (5, 768, 3), (19, 512, 4), (33, 1280, 9)])
def test_int_linear_matches_torch_on_rounded_activations(int_kernels, type_name, rows, k, m):
    """Odd N, several x tiles (9 = 4 + 4 + 1), K with and without a partial 64-byte chunk of codes."""
    raw = random_blocks(type_name, rows, k, torch.Generator().manual_seed(rows * m))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    assert_matches_reference(select.int_linear(x, pack_gguf(raw, type_name, (rows, k))), x, reference_values(raw, type_name))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "MXFP4"])
@pytest.mark.parametrize("k", [32, 96, 576])
def test_int_linear_partial_chunks(int_kernels, type_name, k):
    """Rows of 1, 3 and 18 groups of 32 (the default model's hidden size): masked loads past a row's end."""
    raw = random_blocks(type_name, 7, k, torch.Generator().manual_seed(k))
    x = torch.randn(2, k)
    x[1, :32] = 0  # an all-zero block: scale 0, codes 0
    assert_matches_reference(select.int_linear(x, pack_gguf(raw, type_name, (7, k))), x, reference_values(raw, type_name))


def test_int_linear_on_widened_mixed_weight(int_kernels):
    """A fused Q4_K + Q6_K weight (q8 layout, groups of 16, with offsets) as a Q4_K_M file's QKV gives."""
    gen = torch.Generator().manual_seed(3)
    parts = [("Q4_K", 9), ("Q6_K", 4)]
    raws = [random_blocks(t, rows, 256, gen) for t, rows in parts]
    fused = cat_rows([pack_gguf(raw, t, (rows, 256)) for raw, (t, rows) in zip(raws, parts)])
    assert fused.layout == "q8" and fused.group == 16 and fused.offsets.numel()
    x = torch.randn(3, 256)
    values = torch.cat([reference_values(raw, t) for raw, (t, _) in zip(raws, parts)])
    assert_matches_reference(select.int_linear(x, fused), x, values)


def test_plan_routes_linear_through_the_int_kernels(int_kernels, monkeypatch):
    monkeypatch.setenv(extension.SWITCH_ENV, "1")
    monkeypatch.delenv(select.INT_DOT_ENV, raising=False)
    monkeypatch.setattr(select, "_plan", [])
    assert select.plan().activations == "int16" and select.plan().describe()["activations"] == "int16"
    raw = random_blocks("Q4_1", 11, 64, torch.Generator().manual_seed(4))
    x = torch.randn(2, 64)
    assert_matches_reference(cpu_ops.linear(x, pack_gguf(raw, "Q4_1", (11, 64))), x, reference_values(raw, "Q4_1"))


def test_rows_past_the_integer_limit_take_the_exact_kernel(int_kernels, monkeypatch):
    monkeypatch.setenv(extension.SWITCH_ENV, "1")
    monkeypatch.setattr(select, "_plan", [dataclasses.replace(select._choose(), int_dot_max_rows=2)])
    raw = random_blocks("Q8_0", 7, 64, torch.Generator().manual_seed(7))
    weight, values = pack_gguf(raw, "Q8_0", (7, 64)), reference_values(raw, "Q8_0")
    x = torch.randn(3, 64)
    assert_matches_reference(select.native_linear(x[:2].contiguous(), weight), x[:2], values)
    exact = x.double() @ values.double().T
    torch.testing.assert_close(select.native_linear(x, weight).double(), exact, rtol=0, atol=1e-5 * exact.abs().max().item())


def test_measured_choice_takes_integers_unless_clearly_slower(int_kernels, monkeypatch):
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    monkeypatch.delenv(select.INT_DOT_ENV, raising=False)
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    plan = select._choose()
    assert "int16" in plan.timings_ms
    if plan.kernel == "qgemm":
        int16, fp32 = plan.timings_ms["int16"], plan.timings_ms["qgemm"]
        assert (plan.activations == "int16") == (int16[1] <= select.INT_DOT_MARGIN * fp32[1])
        assert all(int16[rows] <= select.INT_DOT_MARGIN * fp32[rows] for rows in select.PROBE_ROWS
                   if rows <= plan.int_dot_max_rows)
        assert plan.int_dot_max_rows in (0, *select.PROBE_ROWS)


class _NoIntDot:
    """The built kernels as on a CPU without AVX512BW."""

    def __init__(self, ops):
        self._ops = ops

    def has_int_dot(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._ops, name)


@pytest.mark.parametrize("how", ["cpu without avx512bw", "switched off"])
def test_without_integer_kernels_the_plan_keeps_exact_fp32_kernels(monkeypatch, how):
    ops = extension.load()
    if ops is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    if how == "switched off":
        monkeypatch.setenv(select.INT_DOT_ENV, "0")
    else:
        monkeypatch.setattr(extension, "_state", {"ops": _NoIntDot(ops), "reason": None})
    assert not select.int_dot_available()
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    measured = select._choose()
    assert "int16" not in measured.timings_ms and measured.activations == "fp32"
    monkeypatch.setenv(extension.SWITCH_ENV, "1")
    monkeypatch.setattr(select, "_plan", [])
    assert select.plan().activations == "fp32"
    raw = random_blocks("Q4_1", 9, 64, torch.Generator().manual_seed(6))
    x = torch.randn(3, 64)
    expected = x.double() @ reference_values(raw, "Q4_1").double().T  # exact: x is not rounded
    got = cpu_ops.linear(x, pack_gguf(raw, "Q4_1", (9, 64)))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
