"""Minerva's MoE kernels next to triton_kernels' (what vLLM runs gpt-oss with on Hopper), at gpt-oss-20b shapes.

Rows (speedup = triton_kernels' time / ours):
- routing: `kernels.triton.routing.route` vs `triton_kernels.routing.routing`;
- MoE with bf16 experts: `kernels.triton_ops.moe` vs `triton_kernels.routing` + two
  `matmul_ogs` calls (SwiGLU fused into the first, the top-k reduce into the second),
  with the largest difference between the two outputs.
triton_kernels ships with Triton's sources, not as a wheel: where it cannot be imported
the part reports that it was skipped and why. Its MXFP4 weight layouts change between
versions, so MXFP4 experts are not compared here (bench.kernels times ours).

    python -m bench.peer_kernels [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

import torch

from bench.kernels import GPT_OSS_20B, Bench

BATCHES = (1, 8, 64, 256)


def _peer_moe(x: torch.Tensor, logits: torch.Tensor, top_k: int, w_gate_up_t: torch.Tensor, b_gate_up: torch.Tensor,
              w_down_t: torch.Tensor, b_down: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss MoE through triton_kernels (weights `[E, in, out]`, gate/up columns interleaved)."""
    import triton_kernels.swiglu
    from triton_kernels.matmul_ogs import FnSpecs, FusedActivation, PrecisionConfig, matmul_ogs
    from triton_kernels.routing import routing

    rdata, gather, scatter = routing(logits, top_k)
    act = FusedActivation(FnSpecs("swiglu", triton_kernels.swiglu.swiglu_fn, ("alpha", "limit")), (alpha, limit), 2)
    h = matmul_ogs(
        x, w_gate_up_t, b_gate_up, rdata, gather_indx=gather, precision_config=PrecisionConfig(), fused_activation=act
    )
    out: torch.Tensor = matmul_ogs(h, w_down_t, b_down, rdata, scatter_indx=scatter,
                                   precision_config=PrecisionConfig(), gammas=rdata.gate_scal)  # fmt: skip
    return out


def run(device: str = "cuda") -> dict[str, Any]:
    try:
        import triton_kernels.matmul_ogs  # noqa: F401
        import triton_kernels.routing  # noqa: F401
    except Exception as exc:
        return {"skipped": f"triton_kernels cannot be imported here ({type(exc).__name__}: {exc})", "results": []}
    from kernels import triton_ops
    from kernels.triton import routing as triton_routing

    m = GPT_OSS_20B
    b = Bench(device, smoke=False)
    b.measure_device()
    bf = torch.bfloat16
    w_gate_up = torch.randn(m.experts, 2 * m.intermediate, m.hidden, device=device, dtype=bf) * 0.02
    w_down = torch.randn(m.experts, m.hidden, m.intermediate, device=device, dtype=bf) * 0.02
    b_gate_up = torch.randn(m.experts, 2 * m.intermediate, device=device, dtype=bf)
    b_down = torch.randn(m.experts, m.hidden, device=device, dtype=bf)
    w_gate_up_t, w_down_t = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    errors = {}
    for tokens in BATCHES:
        logits = torch.randn(tokens, m.experts, device=device, dtype=bf)
        x = torch.randn(tokens, m.hidden, device=device, dtype=bf)
        try:
            from triton_kernels.routing import routing

            b.record(
                "moe_routing", m.name, f"E{m.experts} top{m.top_k}", tokens,
                lambda: triton_routing.route(m.top_k, m.experts, 16, router_logits=logits), logits.numel() * 2, 0,
                "triton_kernels.routing", lambda: routing(logits, m.top_k),
            )
            ours = lambda: triton_ops.moe(x, logits, m.top_k, w_gate_up, b_gate_up, w_down, b_down)  # noqa: E731
            peer = lambda: _peer_moe(x, logits, m.top_k, w_gate_up_t, b_gate_up, w_down_t, b_down, 1.702, 7.0)  # noqa: E731
            row = b.record(
                "moe bf16 experts", m.name, f"E{m.experts} top{m.top_k}", tokens, ours,
                2 * m.experts * 3 * m.hidden * m.intermediate, 2 * tokens * m.top_k * 3 * m.hidden * m.intermediate,
                "triton_kernels matmul_ogs", peer,
            )
            row.case += f" (max |ours - theirs| {(ours().float() - peer().float()).abs().max().item():.3g})"
        except Exception as exc:  # an API drift in triton_kernels must not lose the other rows
            errors[f"T={tokens}"] = f"{type(exc).__name__}: {exc}"[:400]
    return {"results": [asdict(r) for r in b.results], "errors": errors,
            "copy_gb_per_s": b.copy_gb_per_s, "bf16_tflop_per_s": b.bf16_tflop_per_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    report = run()
    print(report.get("skipped") or json.dumps(report.get("errors", {})))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
