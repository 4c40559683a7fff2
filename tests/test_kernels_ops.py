"""Every kernel backend satisfies `kernels.ops.Ops`: the same ops, the same signatures, declared capabilities."""

from __future__ import annotations

import inspect

import kernel_testing  # noqa: F401  (sets the Triton interpreter up before triton_ops is imported)
import pytest
import torch

import kernels.cpu_ops
import kernels.reference
import kernels.triton_ops
from kernels import mxfp4, select_ops
from kernels.cpu.quant import QuantizedWeight
from kernels.ops import Ops

BACKENDS = {"reference": kernels.reference, "triton_ops": kernels.triton_ops, "cpu_ops": kernels.cpu_ops}


def protocol_ops() -> dict[str, inspect.Signature]:
    """Each op of the protocol with its signature as a module function (no `self`)."""
    ops = {}
    for name, member in vars(Ops).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            signature = inspect.signature(member)
            ops[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return ops


def test_protocol_lists_the_ops():
    assert {"rms_norm", "rope", "paged_attention", "linear", "moe", "moe_experts"} <= set(protocol_ops())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(protocol_ops()))
def test_backend_signature_matches_the_protocol(backend, name):
    expected = protocol_ops()[name]
    op = getattr(BACKENDS[backend], name, None)
    assert callable(op), f"{backend} has no op {name}"
    got = list(inspect.signature(op).parameters.values())
    want = list(expected.parameters.values())
    assert got[:len(want)] == want, f"{backend}.{name}{inspect.signature(op)} != {name}{expected}"
    extra = got[len(want):]
    assert all(p.default is not inspect.Parameter.empty for p in extra), f"{backend}.{name}: extra params need defaults"
    assert inspect.signature(op).return_annotation == expected.return_annotation


@pytest.mark.parametrize("backend", BACKENDS)
def test_capabilities_are_declared(backend):
    module = BACKENDS[backend]
    for name in Ops.__annotations__:
        assert name in vars(module), f"{backend} does not declare {name}"
        assert isinstance(vars(module)[name], bool)


def test_select_ops_returns_a_backend():
    assert select_ops("cpu") is kernels.cpu_ops
    assert select_ops("cpu", "torch") is kernels.reference
    assert select_ops("cpu", "triton") is kernels.triton_ops


def _foreign_weights() -> dict[str, object]:
    """An [8, 64] weight in each layout one backend prepares and another cannot read."""
    checkpoint = mxfp4.quantize(torch.randn(8, 64))
    q8 = QuantizedWeight("q8", torch.ones(8, 64, dtype=torch.int8), torch.ones(8, 2), torch.empty(0), torch.empty(0),
                         "Q8_0")
    return {"swizzled": mxfp4.swizzle(checkpoint), "quantized": q8, "checkpoint": checkpoint}


@pytest.mark.parametrize("backend,layout", [("reference", "swizzled"), ("reference", "quantized"),
                                            ("cpu_ops", "swizzled"), ("triton_ops", "quantized"),
                                            ("triton_ops", "checkpoint")])
def test_a_weight_another_backend_prepared_is_refused(backend, layout):
    """`Weight` is every backend's layouts; each op names the one it cannot read instead of misreading it."""
    weight = _foreign_weights()[layout]
    with pytest.raises(TypeError, match=type(weight).__name__ if layout != "checkpoint" else "prepare_weight"):
        BACKENDS[backend].linear(torch.randn(2, 64), weight)
