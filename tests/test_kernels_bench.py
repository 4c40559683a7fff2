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
