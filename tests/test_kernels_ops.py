"""Every kernel backend satisfies `kernels.ops.Ops`: the same ops, the same signatures, declared capabilities."""

from __future__ import annotations

import inspect

import kernel_testing  # noqa: F401  (sets the Triton interpreter up before triton_ops is imported)
import pytest

import kernels.cpu_ops
import kernels.reference
import kernels.triton_ops
from kernels import select_ops
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
