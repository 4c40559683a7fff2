"""Minerva's compute kernels: Triton on CUDA, the CPU backend (kernels/cpu_ops) on CPU, each beside
its plain-torch reference.

`select_ops` is the one switch the engine uses; every backend satisfies `kernels.ops.Ops`
(the same functions with the same signatures as `kernels.reference`).
"""

from __future__ import annotations

import torch

from kernels.ops import Ops

BACKENDS = ("auto", "cpu", "torch", "triton")


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend `backend` names on `device`: "auto" is Triton on CUDA and the CPU backend
    (quantized GGUF matmuls, kernels/cpu) on CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpu"
    return backend


def select_ops(device: torch.device | str, backend: str = "auto") -> Ops:
    """The op module of `resolve_backend(device, backend)`; the plain torch reference on request."""
    backend = resolve_backend(device, backend)
    if backend == "torch":
        from kernels import reference

        return reference
    if backend == "cpu":
        from kernels import cpu_ops

        return cpu_ops
    from kernels import triton_ops

    return triton_ops
