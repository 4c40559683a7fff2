"""Minerva's compute kernels: Triton on CUDA, each beside its plain-torch reference.

`select_ops` is the one switch the engine uses; both backends satisfy `kernels.ops.Ops`
(the same functions with the same signatures as `kernels.reference`).
"""

from __future__ import annotations

import os
import torch

from kernels.ops import Ops

BACKENDS = ("auto", "torch", "triton")


def select_ops(device: torch.device | str, backend: str | None = None) -> Ops:
    """Torch reference on CPU, Triton kernels on CUDA; `MINERVA_BACKEND` or `backend` overrides."""
    backend = backend or os.environ.get("MINERVA_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "triton" if torch.device(device).type == "cuda" else "torch"
    if backend == "torch":
        from kernels import reference

        return reference
    from kernels import triton_ops

    return triton_ops
