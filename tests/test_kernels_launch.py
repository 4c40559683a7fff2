"""Launch budget: one gpt-oss decode layer issues at most 12 device dispatches (bench/launches.py).

Kernels are stubbed and aten ops counted by a dispatch mode, so this runs on any machine;
the count is what the GPU runs (attention in its split-K decode form).
"""

from __future__ import annotations

import pytest
import torch

import kernel_testing  # noqa: F401  (kernels imported the interpreter's way, as the other kernel tests need)
from bench import launches

LAYER_BUDGET = 12


@pytest.mark.parametrize("batch", [1, 256])
def test_gpt_oss_decode_layer_launch_budget(batch):
    counts = launches.gpt_oss_decode_layer(batch)
    assert sum(counts.values()) <= LAYER_BUDGET, launches.summary(counts)
    assert counts["triton._route_one_launch_kernel"] == 1  # top-k, sort, schedule and output zeroing
    assert counts["triton._matmul_kernel"] == 2  # gate_up and down (the top-k combine is its epilogue)
    assert "aten._local_scalar_dense.default" not in counts, "a host sync in the layer breaks CUDA graphs"


def test_dispatch_counter_sees_launches_and_skips_views():
    from kernels import triton_ops

    x, w = torch.randn(4, 8), torch.ones(16)
    counts = launches.count(lambda: (triton_ops.rms_norm(x.view(2, 16), w, 1e-5), x.t(), x + 1))
    assert counts == {"triton._rms_norm_kernel": 1, "aten.add.Tensor": 1}
