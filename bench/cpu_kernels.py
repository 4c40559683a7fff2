"""The quantized CPU matmuls (kernels/cpu/qgemm*.cpp) per GGUF type against dense fp32 `F.linear`.

Run: python -m bench.cpu_kernels [--rows 1 8 16 64 256 512] [--layers 12] [--threads N]

For each type, `--layers` distinct `[1536, 768]` weights (a small model's projection; ~57 MB in fp32, past
the cores' caches) are multiplied by `rows` activations, interleaved with the dense run over the
same values, best of several rounds. Reported: ms per pass, the ratio dense/quantized, and each
kernel's achieved weight bandwidth against this machine's measured copy bandwidth; also the
start-up choice (kernels/cpu/select.py). From 8 rows on, the many-row kernels are timed beside them:
`dequant` (dequantize per call, then `F.linear`) and, where the CPU has AMX, the tile kernels of
qgemm_tiles.cpp (`tiles-split`, near fp32, and `tiles-bf16`), with their ratio to dense. Up to 64 rows,
where the CPU has them, the integer dot-product kernels of qgemm_int.cpp (`int16`) too, beside `qgemm`
(fp32 activations). Saves bench/results/cpu-kernels.json.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.serve import environment
from bench.result_files import write_result
from kernels.cpu import extension, select
from kernels.cpu.quant import BLOCKS, QuantizedWeight, pack_gguf

SHAPE = (1536, 768)  # K a multiple of 256 for the K-quants
MANY_ROWS = 8  # from here on the many-row kernels are timed too
INT_DOT_ROWS = 64  # up to here the integer dot-product kernels are timed too
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,), "MXFP4": ()}


def random_weight(type_name: str, rows: int, k: int, generator: torch.Generator) -> QuantizedWeight:
    """Random stored blocks with small finite scales (the codes' values do not change the timing)."""
    per_block, block_bytes = BLOCKS[type_name]
    raw = torch.randint(0, 256, (rows * k // per_block, block_bytes), dtype=torch.uint8, generator=generator)
    for at in FP16_FIELDS[type_name]:
        raw[:, at:at + 2] = torch.full((raw.shape[0],), 0.01, dtype=torch.float16).view(torch.uint8).view(-1, 2)
    if type_name == "MXFP4":
        raw[:, 0] = 120
    return pack_gguf(raw, type_name, (rows, k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64, 256, 512])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if extension.load() is None:
        print(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
        return 1
    n, k = SHAPE
    generator = torch.Generator().manual_seed(0)
    copy = select.copy_bandwidth_gbs()
    results = {}
    for type_name in BLOCKS:
        stacked = random_weight(type_name, args.layers * n, k, generator)
        quantized = [stacked.select_rows(slice(i * n, (i + 1) * n)) for i in range(args.layers)]
        dense = [w.dequantize() for w in quantized]
        per_rows = {}
        for rows in args.rows:
            x = torch.randn(rows, k, generator=generator)
            kernels: dict[str, Callable[[], object]] = {"qgemm": lambda: [select.exact_linear(x, w) for w in quantized],
                       "dense": lambda: [F.linear(x, w) for w in dense]}
            if rows <= INT_DOT_ROWS and select.int_dot_available():
                kernels["int16"] = lambda: [select.int_linear(x, w) for w in quantized]
            if rows >= MANY_ROWS:
                kernels["dequant"] = lambda: [F.linear(x, w.dequantize()) for w in quantized]
                if select.tiles_available():
                    for name, terms in select.TILE_TERMS.items():
                        def tiles(terms: int = terms) -> list[torch.Tensor]:
                            return [select.tiles_linear(x, w, terms) for w in quantized]

                        kernels[name] = tiles
            best = dict.fromkeys(kernels, float("inf"))
            for _ in range(args.rounds + 1):
                for name, run in kernels.items():
                    best[name] = min(best[name], select._ms(run))
            per_rows[rows] = {
                "qgemm_ms": round(best["qgemm"], 3), "dense_ms": round(best["dense"], 3),
                "speedup": round(best["dense"] / best["qgemm"], 2),
                "qgemm_weight_gbs": round(stacked.nbytes / best["qgemm"] / 1e6, 2),
                "dense_weight_gbs": round(sum(w.numel() * 4 for w in dense) / best["dense"] / 1e6, 2),
            }
            for name in ("int16", "dequant", *select.TILE_TERMS):
                if name in best:
                    per_rows[rows][f"{name}_ms"] = round(best[name], 3)
                    per_rows[rows][f"{name}_speedup"] = round(best["dense"] / best[name], 2)
            if "int16" in best:
                per_rows[rows]["int16_weight_gbs"] = round(stacked.nbytes / best["int16"] / 1e6, 2)
            print(f"{type_name:5s} {rows:3d} rows: qgemm {best['qgemm']:.2f} ms, dense {best['dense']:.2f} ms "
                  f"({per_rows[rows]['speedup']:.2f}x); {per_rows[rows]['qgemm_weight_gbs']:.1f} GB/s of weights "
                  f"vs copy {copy:.1f} GB/s" + "".join(f"; {name} {best[name]:.2f} ms ({best['dense'] / best[name]:.2f}x)"
                                                        for name in ("int16", "dequant", *select.TILE_TERMS) if name in best)
                  + (f"; int16 {per_rows[rows]['int16_weight_gbs']:.1f} GB/s" if "int16" in best else ""), flush=True)
        results[type_name] = {"bytes_per_weight": round(stacked.nbytes / (args.layers * n * k), 3), "rows": per_rows}
    record = {"benchmark": "cpu_kernels", "shape": SHAPE, "layers": args.layers, "threads": torch.get_num_threads(),
              "copy_gbs": round(copy, 2), "results": results, "startup_choice": select.plan().describe(),
              "environment": environment()}
    write_result("cpu-kernels.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
