"""Minerva's compute kernels: Triton on CUDA, the CPU backend (kernels/cpu_ops) on CPU, each beside
its plain-torch reference.

`select_ops` is the one switch the engine uses; every backend satisfies `kernels.ops.Ops`
(the same functions with the same signatures as `kernels.reference`).
"""

from __future__ import annotations

import os
import torch

from kernels.ops import Ops

BACKENDS = ("auto", "cpu", "torch", "triton")


def select_ops(device: torch.device | str, backend: str | None = None) -> Ops:
    """The CPU backend (quantized GGUF matmuls, kernels/cpu) on CPU, Triton kernels on CUDA; the plain
    torch reference on request. `MINERVA_BACKEND` or `backend` overrides."""
    backend = backend or os.environ.get("MINERVA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "cpu"
    if backend == "torch":
        from kernels import reference

        return reference
    if backend == "cpu":
        from kernels import cpu_ops

        return cpu_ops
    from kernels import triton_ops

    return triton_ops
