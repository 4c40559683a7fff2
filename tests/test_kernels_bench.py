"""Smoke run of the kernel benchmark harness and the GPU-suite report on tiny shapes (interpreter on CPU)."""

from __future__ import annotations

import pytest

from bench import gpu_suite, kernels as kernel_bench
from kernel_testing import INTERPRET, interpreter, poisoned_outputs  # noqa: F401


@pytest.mark.skipif(not INTERPRET, reason="smoke shapes are for the CPU interpreter")
def test_kernel_bench_smoke_and_report(tmp_path):
    report = kernel_bench.run(smoke=True, device="cpu")
    assert report["errors"] == {}
    kernels = {r["kernel"] for r in report["results"]}
    assert {"mxfp4_linear", "mxfp4_moe", "paged_attention decode", "paged_attention prefill", "rope"} <= kernels
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in report["results"])
    targets = gpu_suite.check_targets(report["results"])
    assert [t["target"].split()[0] for t in targets] == ["MXFP4", "paged"]  # no batch-256 MoE row in smoke
    md = gpu_suite.markdown(
        {"date": "d", "environment": {"gpu": "x"}, "parts": {"bench": {"rc": 0, "seconds": 1, "report": report}},
         "rows": report["results"], "targets": targets, "ceilings": {"copy_gb_per_s": 1.0, "bf16_tflop_per_s": 1.0}}
    )
    assert md.count("| mxfp4_moe |") == 2


TINY_GPT_OSS = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32, "experts": 4,
                "top_k": 2, "inter": 64, "vocab": 96, "window": 8}


@pytest.mark.skipif(not INTERPRET, reason="tiny stack is for the CPU interpreter")
def test_decode_stack_triton_equals_torch():
    """The GPU suite's gpt-oss decode step, shrunk: Triton ops and torch ops give the same logits
    on the same random weights (2 layers, GQA, sinks, sliding window, MXFP4 MoE, bf16)."""
    import torch

    from kernels import reference, triton_ops

    runs = {}
    for name, ops in (("torch", reference), ("triton", triton_ops)):
        torch.manual_seed(0)
        runs[name] = gpu_suite.kernel_stack_decode(
            batches=(3,), context=20, config=TINY_GPT_OSS, device="cpu", ops=ops
        )["batch 3"]["logits"]
    want, got = runs["torch"], runs["triton"]
    assert want.shape == (3, 96) and want.abs().max() > 0
    rel = (got - want).abs().max() / want.abs().max()
    assert rel < 3e-2, rel  # bf16 through 2 layers
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.skipif(not INTERPRET, reason="tiny model is for the CPU interpreter")
def test_engine_model_decode_harness():
    """The GPU suite's engine.models decode benchmark on a tiny gpt-oss of random MXFP4 weights."""
    import torch

    from kernels import triton_ops

    config = gpu_suite.gpt_oss_config(
        layers=2, hidden=64, heads=4, kv_heads=2, head_dim=32, experts=4, top_k=2, inter=64, vocab=96, window=8
    )
    result = gpu_suite.engine_model_decode(config, device="cpu", batches=(3,), context=20, ops=triton_ops)
    logits = result["batch 3"]["logits"]
    assert logits.shape == (3, 96) and torch.isfinite(logits).all() and logits.abs().max() > 0
    assert result["batch 3"]["eager_ms"] > 0


def test_peer_kernels_report_why_they_were_skipped(monkeypatch):
    import sys

    from bench import peer_kernels

    monkeypatch.setitem(sys.modules, "triton_kernels", None)  # as where it is not installed
    report = peer_kernels.run("cpu")
    assert report["results"] == [] and "triton_kernels cannot be imported" in report["skipped"]
