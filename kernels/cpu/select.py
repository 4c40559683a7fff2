"""Start-up choice of the CPU matmul for GGUF-quantized weights, by measurement on this machine.

Candidates: `dense` (weights dequantized to fp32 at load, torch's `F.linear`: today's path) and
`qgemm` (weights kept quantized, read by qgemm.cpp). Both run through a stack of distinct Q4_1
projections of the default model's size (~40 MB in fp32, so the weights stream from beyond the
cores' caches as in a forward pass) at 1 to 256 rows; `qgemm` is chosen when it is faster at one row
(a single stream's decode), and it serves every batch up to the largest row count where it still
beats the kernel for many rows (batched decode, verification rows, prefill). That kernel is
`dequant` (a cache-sized chunk of weight rows dequantized per call, then `F.linear`: exact fp32) or,
where the CPU has AMX-BF16 and they are faster at 64 rows, the tile kernels (qgemm_tiles.cpp: a bf16
panel of 32 weight rows dequantized once per call, every x row multiplied on the tile unit). By
default they split x and each weight value into two bf16 (`tiles-split`, near fp32: on SmolLM2's
prefill over 2,000 positions the same top-1 token everywhere and the same perplexity as fp32);
MINERVA_CPU_TILES=bf16 rounds both to one bf16 (`tiles-bf16`: about twice as fast at 16-96 rows;
99.25% top-1 agreement, perplexity +0.005%); MINERVA_CPU_TILES=0 never uses them. Where the CPU has
AVX512BW, `int16` (qgemm_int.cpp: activations rounded to int16 per block of 32, integer dot products,
VNNI where present) is timed too and replaces qgemm's fp32 activations in place for batches up to the
largest row count where it is not clearly slower (MINERVA_CPU_INT_DOT=0 keeps fp32 activations:
dequantize-then-matmul exactly). The choice, the
timings and the achieved weight bandwidth against this machine's copy bandwidth are logged once
and kept in `plan().describe()` (the server's /v1/models metadata).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import takewhile

import torch
import torch.nn.functional as F

from kernels.cpu import extension
from kernels.cpu.quant import SUPPORTED_TYPES, QuantizedWeight, pack_gguf

log = logging.getLogger(__name__)

PROBE_SHAPE = (1536, 576)  # SmolLM2's gate/up rows x hidden: a small model's typical projection
PROBE_LAYERS = 12  # distinct weights per pass (~40 MB in fp32: past any core's cache)
PROBE_ROWS = (1, 4, 8, 16, 64, 256)
DEQUANT_BYTES = 2**20  # fp32 bytes of weight `dequant` makes at a time: fits a core's L2
TILES_ENV = "MINERVA_CPU_TILES"  # "0": never the tile kernels; "bf16": one bf16 per value; else split (near fp32)
TILE_TERMS = {"tiles-split": 3, "tiles-bf16": 1}  # bf16 products per multiply-add (qgemm_tiles.cpp's `terms`)
INT_DOT_ENV = "MINERVA_CPU_INT_DOT"  # "0": never round activations to integers (exact fp32 kernels only)
INT_DOT_MARGIN = 1.1  # int16 serves a row count unless slower than fp32 activations by more than this
PROBE_ROUNDS, PROBE_SECONDS = 7, 1.0  # interleaved rounds, best of each (a busy machine slows both alike)
# Timed on one thread: on a busy machine a two-thread region of such small ops waits out the other
# thread's scheduling delay (milliseconds), which would drown the kernels' own cost; the candidates
# split rows across threads alike, so one thread ranks them as two do.


@dataclass(frozen=True)
class Plan:
    kernel: str  # "qgemm" | "dense"
    native_max_rows: int  # batches up to this many rows read quantized weights in place
    types: tuple[str, ...]  # GGUF types kept quantized (empty with "dense")
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    bandwidth_gbs: dict[str, float] = field(default_factory=dict)
    many_rows: str = "dequant"  # past native_max_rows: a TILE_TERMS kernel (qgemm_tiles.cpp) or "dequant" (F.linear)
    int_dot_max_rows: int = 0  # in place, batches up to this many rows use qgemm_int.cpp (int16 x); above, qgemm.cpp
    int_dot_timed_on_model: bool = False  # int_dot_max_rows set from a served model's own forwards, not the probe

    @property
    def activations(self) -> str:
        """How x enters the in-place kernels of a single stream's decode: "int16" or "fp32" (exact)."""
        return "int16" if self.int_dot_max_rows else "fp32"

    def describe(self) -> dict[str, object]:
        return {"kernel": self.kernel, "activations": self.activations, "int_dot_max_rows": self.int_dot_max_rows,
                "int_dot_max_rows_timed_on": "model" if self.int_dot_timed_on_model else "probe",
                "native_max_rows": self.native_max_rows,
                "many_rows": self.many_rows,
                "quantized_types": list(self.types),
                "reason": self.reason, "timings_ms": {k: {str(r): t for r, t in v.items()}
                                                      for k, v in self.timings_ms.items()},
                "bandwidth_gbs": self.bandwidth_gbs}


_lock = threading.Lock()
_plan: list[Plan] = []


def plan() -> Plan:
    """This process's choice, measured on first use."""
    with _lock:
        if not _plan:
            _plan.append(_choose())
            log.info("CPU matmul for GGUF weights: %s", _plan[0].describe())
        return _plan[0]


def chosen() -> Plan | None:
    """The plan if this process has made it (a model with quantized weights loaded), without measuring."""
    with _lock:
        return _plan[0] if _plan else None


def set_int_dot_max_rows(rows: int, timed_on_model: bool = False) -> None:
    """Serve in-place batches up to `rows` rows with int16 activations (above, qgemm.cpp's fp32 ones): for a
    caller that times a served model's own forwards both ways, whose weights stream as the probe's (in cache)
    do not (engine/cpu_kernel_plan.py); `timed_on_model` marks its final choice."""
    with _lock:
        if _plan:
            _plan[0] = replace(_plan[0], int_dot_max_rows=rows, int_dot_timed_on_model=timed_on_model)


def native_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """`x @ weight.T` by the planned in-place kernel for this many rows (int16 or fp32 activations): `x`
    contiguous fp32 `[M, K]`, `weight` 2-D."""
    return (int_linear if x.shape[0] <= plan().int_dot_max_rows else exact_linear)(x, weight)


def exact_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """`x @ weight.T` by qgemm.cpp: dequantize-then-matmul in fp32."""
    ops = extension.require()
    if weight.layout == "q4":
        return ops.q4_linear(x, weight.qs, weight.scales, weight.offsets, weight.codebook)
    return ops.q8_linear(x, weight.qs, weight.scales, weight.offsets)


def dequant_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """`x @ weight.T` exactly as dequantize-then-matmul in fp32: a chunk of weight rows at a time, small
    enough to stay in a core's cache while torch's GEMM reads it (no fp32 copy of the whole weight)."""
    rows = max(16, DEQUANT_BYTES // (4 * weight.shape[-1]))
    y = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], rows):
        y[:, start:start + rows] = F.linear(x, weight.select_rows(slice(start, start + rows)).dequantize())
    return y


def tiles_linear(x: torch.Tensor, weight: QuantizedWeight, terms: int) -> torch.Tensor:
    """`x @ weight.T` by qgemm_tiles.cpp (AMX-BF16) for many rows of `x`: x and the weight values rounded to
    bf16 (`terms` 1) or each split into two bf16 (3: near fp32, three times the tile work)."""
    ops = extension.require()
    if weight.layout == "q4":
        return ops.q4_linear_tiles(x, weight.qs, weight.scales, weight.offsets, weight.codebook, terms)
    return ops.q8_linear_tiles(x, weight.qs, weight.scales, weight.offsets, terms)


def tiles_available() -> bool:
    """The AMX tile kernels are built for this CPU, the OS grants the tile state, and they are not switched off."""
    ops = extension.load()
    return ops is not None and os.environ.get(TILES_ENV) != "0" and bool(ops.tiles_available())


def int_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """`x @ weight.T` by qgemm_int.cpp: x rounded to int16 per block of 32, integer dot products."""
    ops = extension.require()
    if weight.layout == "q4":
        return ops.q4_linear_int(x, weight.qs, weight.scales, weight.offsets, weight.codebook)
    return ops.q8_linear_int(x, weight.qs, weight.scales, weight.offsets)


def int_dot_available() -> bool:
    """The integer dot-product kernels are built for this CPU and not switched off."""
    ops = extension.load()
    return ops is not None and os.environ.get(INT_DOT_ENV) != "0" and bool(ops.has_int_dot())


def _ms(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def _best_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    return min(_ms(fn) for _ in range(repeats))


def copy_bandwidth_gbs() -> float:
    """This machine's memory copy bandwidth (read + write), the yardstick of the kernels' GB/s."""
    src = torch.empty(16 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_ms(lambda: dst.copy_(src)) / 1e6


def _choose() -> Plan:
    ops = extension.load()
    if ops is None:
        return Plan("dense", 0, (), f"native kernels unavailable: {extension.unavailable_reason()}")
    if os.environ.get(extension.SWITCH_ENV) == "1":
        return Plan("qgemm", PROBE_ROWS[-1], SUPPORTED_TYPES, f"{extension.SWITCH_ENV}=1 (not measured)",
                    int_dot_max_rows=PROBE_ROWS[-1] if int_dot_available() else 0)
    n, k = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (PROBE_LAYERS * n, k // 32 * 20), dtype=torch.uint8, generator=generator).view(-1, 20)
    raw[:, :4] = torch.full((raw.shape[0], 2), 0.01, dtype=torch.float16).view(torch.uint8)
    stacked = pack_gguf(raw, "Q4_1", (PROBE_LAYERS * n, k))
    quantized = [stacked.select_rows(slice(i * n, (i + 1) * n)) for i in range(PROBE_LAYERS)]
    dense = [w.dequantize() for w in quantized]
    candidates = {"qgemm": lambda x: [exact_linear(x, w) for w in quantized],
                  "dense": lambda x: [F.linear(x, w) for w in dense],
                  "dequant": lambda x: [dequant_linear(x, w) for w in quantized]}
    tiles = None
    if tiles_available():
        tiles = "tiles-bf16" if os.environ.get(TILES_ENV) == "bf16" else "tiles-split"
        candidates[tiles] = lambda x: [tiles_linear(x, w, TILE_TERMS[tiles]) for w in quantized]
    if int_dot_available():
        candidates["int16"] = lambda x: [int_linear(x, w) for w in quantized]
    inputs = {rows: torch.randn(rows, k, generator=generator) for rows in PROBE_ROWS}
    timings: dict[str, dict[int, float]] = {name: dict.fromkeys(PROBE_ROWS, float("inf")) for name in candidates}
    deadline = time.perf_counter() + PROBE_SECONDS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(PROBE_ROUNDS + 1):  # round 0 warms up
            for rows, x in inputs.items():
                for name, run in candidates.items():
                    elapsed = _ms(lambda: run(x))
                    if round_:
                        timings[name][rows] = round(min(timings[name][rows], elapsed), 3)
            if round_ and time.perf_counter() > deadline:
                break
    finally:
        torch.set_num_threads(threads)
    copy = copy_bandwidth_gbs()
    bandwidth = {"copy": round(copy, 2),
                 "qgemm_1_row": round(stacked.nbytes / timings["qgemm"][1] / 1e6, 2),
                 "dense_1_row": round(sum(w.numel() * 4 for w in dense) / timings["dense"][1] / 1e6, 2)}
    # The probe's weights sit in the last-level cache, where the two tie at one row (within ~3%); a model's
    # weights stream from DRAM, where the integer kernels' prefetch reads them ~1.9x faster (133 MB of Q4_1
    # rows, one thread: 15.7 vs 8.4 GB/s), so they win unless measured clearly slower here.
    int_rows = 0
    if "int16" in timings:
        int_rows = max(takewhile(lambda rows: timings["int16"][rows] <= INT_DOT_MARGIN * timings["qgemm"][rows], PROBE_ROWS),
                       default=0)
        bandwidth["int16_1_row"] = round(stacked.nbytes / timings["int16"][1] / 1e6, 2)
    native = {rows: timings["int16" if rows <= int_rows else "qgemm"][rows] for rows in PROBE_ROWS}
    activations = f"int16 activations up to {int_rows} rows" if int_rows else "fp32 activations"
    many = tiles if tiles and timings[tiles][64] < timings["dequant"][64] else "dequant"
    if native[1] <= timings["dense"][1]:
        max_rows = max(takewhile(lambda rows: rows == 1 or native[rows] <= timings[many][rows], PROBE_ROWS))
        reason = f"faster than dense at 1 row ({activations}); in place up to {max_rows} rows, {many} beyond"
        return Plan("qgemm", max_rows, SUPPORTED_TYPES, reason, timings, bandwidth, many_rows=many, int_dot_max_rows=int_rows)
    return Plan("dense", 0, (), "dense fp32 was faster at one row on this CPU", timings, bandwidth)
