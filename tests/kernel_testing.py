"""Shared setup for the Triton kernel tests.

Without a GPU the kernels run under Triton's CPU interpreter. Triton decides at
`@triton.jit` time whether a kernel is interpreted, and the interpreter reads the
switch again while running, so `TRITON_INTERPRET=1` is set while the kernel
modules are imported and, through the `interpreter` fixture, while kernel tests
run; the rest of the suite never sees it. With a GPU nothing is interpreted and
the same tests run on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

INTERPRET = not torch.cuda.is_available()


def _rounding_convert_float(original):
    """The interpreter (triton 3.9) narrows fp32 to bf16 by truncation; GPUs round to nearest even.

    Truncation biases every bf16 store toward zero and compounds through a model, so
    the interpreter's converter is wrapped to round like the hardware (via torch).
    """

    def convert(values, input_dtype, output_dtype, rounding_mode):
        import numpy as np
        import triton.language as tl

        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(values).view(np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16)
        return original(values, input_dtype, output_dtype, rounding_mode)

    return convert


@contextmanager
def interpreter_env() -> Iterator[None]:
    """TRITON_INTERPRET=1 (with hardware-like bf16 rounding) for the duration, CPU only; restored after."""
    if not INTERPRET:
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter  # first import of triton must see the switch

    original = interpreter._convert_float
    interpreter._convert_float = _rounding_convert_float(original)
    try:
        yield
    finally:
        interpreter._convert_float = original
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


with interpreter_env():
    from kernels import triton_ops  # noqa: F401  (kernels decorated as interpreted on CPU)

if INTERPRET:
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    from kernels.triton.norm import _rms_norm_kernel

    if not all(isinstance(f, InterpretedFunction) for f in (_rms_norm_kernel, triton.language.standard.sigmoid)):
        raise RuntimeError(
            "triton or kernels.triton was imported before tests/kernel_testing.py set TRITON_INTERPRET=1, "
            "so the kernels cannot run on this CPU; import kernel_testing first"
        )

# Where the kernels can run here: the interpreter on CPU, or the GPU (marked `cuda`).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="kernels run on the GPU here")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]

# Max relative error (max |err| / max |ref|) allowed per output dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpreter():
    with interpreter_env():
        yield


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every torch.empty/empty_like during a kernel test is pre-filled with NaN (or a sentinel for
    integers), so an output element the kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30) if t.dtype.is_signed else 77)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Relative error against the reference within the tolerance of `dtype`; NaN anywhere fails."""
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.float().cpu(), expected.float().cpu()
    assert not torch.isnan(a).any(), "kernel left NaN (unwritten or poisoned) elements"
    rel = (a - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
    assert rel < REL_TOL[dtype], f"relative error {rel:.3g} >= {REL_TOL[dtype]:g} for {dtype}"
