"""The many-row quantized CPU kernels (kernels/cpu/qgemm_tiles.cpp, AMX-BF16; the exact `dequant` fallback)
against torch.

With `terms` 1 they round x and each dequantized weight value to bf16 (nearest even) and sum the exact
products in fp32, so they must equal torch's matmul of the bf16-rounded operands to fp32 summation
order: error <= 1e-5 of the output's scale against a float64 matmul of those operands. With `terms` 3
each operand v is carried as hi = bf16(v) and lo = bf16(v - hi), and the result must equal
x_hi w_hi + x_lo w_hi + x_hi w_lo (float64) to the same 1e-5, and the exact fp32 product to 1e-4.
Skipped where the CPU or the OS gives no AMX tiles; the plan then never picks them (tested here on
every machine).
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_ops
from kernels.cpu import extension, select
from kernels.cpu.quant import BLOCKS, pack_gguf
from tests.test_kernels_cpu_quant import random_blocks, reference_values


@pytest.fixture(scope="module")
def tiles():
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    if not extension.load().tiles_available():
        pytest.skip("no AMX-BF16 tiles on this CPU (or the OS refused the tile state)")


def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = v.bfloat16().double()
    return hi, (v.double() - hi).bfloat16().double()


def tiles_reference(x: torch.Tensor, values: torch.Tensor, terms: int) -> torch.Tensor:
    """What the tile unit computes, in float64."""
    (x_hi, x_lo), (w_hi, w_lo) = split(x), split(values)
    if terms == 1:
        return x_hi @ w_hi.T
    return x_hi @ w_hi.T + x_lo @ w_hi.T + x_hi @ w_lo.T


@pytest.mark.parametrize("terms", [1, 3])
@pytest.mark.parametrize("type_name", sorted(BLOCKS))
@pytest.mark.parametrize("n,k,m", [(37, 512, 1), (37, 512, 13), (64, 256, 32), (100, 768, 77), (33, 256, 200)])
def test_tiles_match_torch_on_the_same_bf16_operands(tiles, terms, type_name, n, k, m):
    """Odd N (a partial panel), M below, at and past one 32-row pass, every GGUF type's layout."""
    raw = random_blocks(type_name, n, k, torch.Generator().manual_seed(n * m + k))
    weight = pack_gguf(raw, type_name, (n, k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    values = reference_values(raw, type_name)
    expected = tiles_reference(x, values, terms)
    got = select.tiles_linear(x, weight, terms)
    assert got.shape == (m, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    exact = x.double() @ values.double().T
    error = ((got.double() - exact).abs().max() / exact.abs().max()).item()
    assert error < (1e-2 if terms == 1 else 1e-4)


def test_linear_sends_many_rows_to_the_tiles(tiles, monkeypatch):
    """A plan with `tiles` for many rows: rows past native_max_rows (with a bias) take them, fewer stay exact."""
    plan = select.Plan("qgemm", 4, ("Q4_1",), "test", many_rows="tiles-bf16")
    monkeypatch.setattr(select, "_plan", [plan])
    raw = random_blocks("Q4_1", 40, 256, torch.Generator().manual_seed(5))
    weight = pack_gguf(raw, "Q4_1", (40, 256))
    values, bias = reference_values(raw, "Q4_1"), torch.randn(40)
    many, few = torch.randn(3, 30, 256), torch.randn(4, 256)
    expected = tiles_reference(many.reshape(-1, 256), values, 1) + bias.double()
    got = cpu_ops.linear(many, weight, bias)
    assert got.shape == (3, 30, 40)
    torch.testing.assert_close(got.reshape(-1, 40).double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    exact = few.double() @ values.double().T
    torch.testing.assert_close(cpu_ops.linear(few, weight).double(), exact, rtol=0, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("setting,kernel", [(None, "tiles-split"), ("bf16", "tiles-bf16")])
def test_start_up_times_the_tiles_where_available(monkeypatch, setting, kernel):
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    if setting is None:
        monkeypatch.delenv(select.TILES_ENV, raising=False)
    else:
        monkeypatch.setenv(select.TILES_ENV, setting)
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    plan = select._choose()
    if not select.tiles_available():
        assert not set(select.TILE_TERMS) & set(plan.timings_ms) and plan.many_rows == "dequant"
        return
    assert set(select.TILE_TERMS) & set(plan.timings_ms) == {kernel}
    faster = plan.timings_ms[kernel][64] < plan.timings_ms["dequant"][64]
    assert plan.kernel != "qgemm" or plan.many_rows == (kernel if faster else "dequant")
    assert plan.describe()["many_rows"] == plan.many_rows


def test_switched_off_tiles_are_never_timed_or_used(monkeypatch):
    """MINERVA_CPU_TILES=0 (or a CPU without AMX): many rows are dequantized per call, fp32 throughout."""
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    monkeypatch.setenv(select.TILES_ENV, "0")
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    assert not select.tiles_available()
    plan = select._choose()
    assert not set(select.TILE_TERMS) & set(plan.timings_ms) and plan.many_rows == "dequant"


@pytest.mark.parametrize("type_name", sorted(BLOCKS))
def test_dequant_fallback_is_exact_fp32_across_chunks(type_name, monkeypatch):
    """The many-row kernel without AMX (or with MINERVA_CPU_TILES=0): chunks of weight rows dequantized and
    multiplied by torch, here forced into several chunks with a partial last one."""
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    monkeypatch.setattr(select, "DEQUANT_BYTES", 16 * 256 * 4)  # 16 rows of K = 256 per chunk
    raw = random_blocks(type_name, 37, 256, torch.Generator().manual_seed(11))
    weight = pack_gguf(raw, type_name, (37, 256))
    x = torch.randn(45, 256)
    expected = x.double() @ reference_values(raw, type_name).double().T
    got = select.dequant_linear(x, weight)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
