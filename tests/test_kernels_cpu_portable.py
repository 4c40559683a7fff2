"""The native CPU kernels built for an AVX2-only CPU (`-march=haswell`: AVX2, FMA, F16C; no AVX-512, no AMX).

A machine with AVX-512 never compiles the kernels' `#else` paths, yet CPUs of this project's machines differ
(AVX2 only, AVX-512, AMX). So one test builds the kernels again for haswell (MINERVA_CPU_MARCH: its own
cache directory, ~30 s on one core here) and runs, in a subprocess on that build, the kernel tests against
their references (gguf's dequantization, torch's matmul, kernels.reference's layer ops with fp32/fp16/bf16
KV caches, transformers' greedy tokens) and this file's own checks that the build really is AVX2-only and
that the start-up plan then times and chooses among the kernels that exist.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.cpu import extension, select
from kernels.cpu.quant import pack_gguf

PORTABLE_MARCH = "haswell"
KERNEL_TESTS = [
    "tests/test_kernels_cpu_quant.py",
    "tests/test_kernels_cpu_layer_ops.py",
    "tests/test_kernels_cpu_int_dot.py",
    "tests/test_kernels_cpu_tiles.py",
    "tests/test_kernels_cpu_native.py",
    "tests/test_cpu_kernel_plan.py",
    "tests/test_models_gguf.py",
    "tests/test_smollm2.py::test_greedy_tokens_equal_transformers_on_the_same_gguf",
]
ROOT = Path(__file__).resolve().parents[1]
in_portable_build = pytest.mark.skipif(os.environ.get(extension.MARCH_ENV) != PORTABLE_MARCH,
                                       reason=f"checks of the {PORTABLE_MARCH} build: run by the test below in its subprocess")


@pytest.mark.slow
def test_kernels_built_for_avx2_only_pass_their_reference_tests():
    if os.environ.get(extension.MARCH_ENV):
        pytest.skip(f"this run is itself a {extension.MARCH_ENV} build's")
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma", "f16c"} <= set(extension.cpu_flags().split()):
        pytest.skip("an AVX2 build runs only on an x86-64 CPU with AVX2, FMA and F16C")
    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    env = {**os.environ, extension.MARCH_ENV: PORTABLE_MARCH}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *KERNEL_TESTS, __file__],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for check in ("test_the_build_has_no_avx512_or_amx", "test_the_plan_times_only_the_kernels_built"):
        assert re.search(rf"^PASSED \S+::{check}\b", output, re.MULTILINE), f"{check} did not pass:\n{output[-3000:]}"


@in_portable_build
def test_the_build_has_no_avx512_or_amx():
    ops = extension.require()
    assert not ops.has_avx512() and not ops.has_int_dot() and not ops.tiles_available()
    assert list(ops.flash_head_dims()) == []
    objdump = shutil.which("objdump")
    if objdump is None:
        return
    library = extension.cache_dir() / "minerva_cpu_kernels.so"
    code = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True).stdout
    assert "%ymm" in code, "the AVX2 build uses no 256-bit registers"
    assert not re.search(r"%zmm|%k[1-7]\b|%tmm|tdpbf16", code), "the AVX2 build holds AVX-512 or AMX instructions"


@in_portable_build
def test_the_plan_times_only_the_kernels_built(monkeypatch):
    """No int16 and no tiles where the CPU has neither: qgemm or dense by measurement, many rows dequantized."""
    monkeypatch.delenv(extension.SWITCH_ENV, raising=False)
    monkeypatch.delenv(select.INT_DOT_ENV, raising=False)
    monkeypatch.delenv(select.TILES_ENV, raising=False)
    monkeypatch.setattr(select, "PROBE_ROUNDS", 1)
    plan = select._choose()
    assert set(plan.timings_ms) == {"qgemm", "dense", "dequant"}
    assert plan.int_dot_max_rows == 0 and plan.activations == "fp32" and plan.many_rows == "dequant"
    assert (plan.kernel == "qgemm") == (plan.timings_ms["qgemm"][1] <= plan.timings_ms["dense"][1])
    with pytest.raises(RuntimeError, match="AVX512BW"):
        select.int_linear(torch.randn(1, 64), _q4_weight())


def _q4_weight():
    raw = torch.randint(0, 256, (4 * 2, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw[:, :4] = torch.full((raw.shape[0], 2), 0.01, dtype=torch.float16).view(torch.uint8)
    return pack_gguf(raw.reshape(4, -1), "Q4_1", (4, 64))
