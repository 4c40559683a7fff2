"""kernels/cpu/native.py states the native ops' signatures for the type checker: held here to the schemas
the C++ files register, and callers of a missing build get the reason, not an AttributeError on None."""

from __future__ import annotations

import inspect

import pytest
import torch

from kernels.cpu import extension, select
from kernels.cpu.native import NativeKernels
from kernels.cpu.quant import QuantizedWeight


def _declared() -> dict[str, list[str]]:
    return {name: list(inspect.signature(member).parameters)[1:] for name, member in vars(NativeKernels).items()
            if inspect.isfunction(member) and not name.startswith("_")}


def test_the_protocol_names_every_registered_op_with_its_arguments():
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("minerva_cpu::")}
    assert set(_declared()) == registered
    for name, arguments in _declared().items():
        schema = getattr(torch.ops.minerva_cpu, name).default._schema
        assert arguments == [argument.name for argument in schema.arguments], name


def test_a_planned_kernel_without_a_build_names_the_reason(monkeypatch):
    monkeypatch.setattr(extension, "_state", {"ops": None, "reason": "no compiler here"})
    weight = QuantizedWeight("q8", torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), torch.empty(0),
                             torch.empty(0), "Q8_0")
    for call in (select.exact_linear, select.int_linear, lambda x, w: select.tiles_linear(x, w, 3)):
        with pytest.raises(RuntimeError, match="quantized CPU kernels unavailable: no compiler here"):
            call(torch.zeros(1, 32), weight)
