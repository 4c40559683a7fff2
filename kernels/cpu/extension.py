"""Build and load the native CPU kernels (qgemm*.cpp: quantized matmuls; layer_ops.cpp: fused
per-layer ops) once per machine, cached on disk.

The build targets this CPU (`-march=native`) unless MINERVA_CPU_MARCH names another target (e.g.
`haswell`: AVX2 + FMA + F16C, the kernels' non-AVX-512 paths, as tests/test_kernels_cpu_portable.py
builds them), so the cache key holds the source, torch's version, the CPU's flags and the compiler
flags: another CPU, target or torch builds its own copy. Any failure (no compiler, no ninja,
a compile error) leaves `load()` returning None with the reason in `unavailable_reason()`, and the
CPU ops fall back to dense weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import TypedDict, cast

import torch

from kernels.cpu.native import NativeKernels

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("qgemm.cpp", "qgemm_int.cpp", "qgemm_tiles.cpp", "layer_ops.cpp")]
CACHE_ENV = "MINERVA_KERNEL_CACHE"  # where builds are kept; default ~/.cache/minerva/kernels
SWITCH_ENV = "MINERVA_CPU_QGEMM"  # "0": never build (dense weights); "1": use without measuring (select.py)
MARCH_ENV = "MINERVA_CPU_MARCH"  # the compiler's -march target; default "native" (this CPU)

_lock = threading.Lock()


class _Attempt(TypedDict, total=False):
    """The one build attempt: the kernels, or None and why not."""

    ops: NativeKernels | None
    reason: str | None


_state: _Attempt = {}


def cpu_flags() -> str:
    """The CPU's feature flags (Linux), or the machine name where /proc/cpuinfo is absent."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def compile_flags() -> list[str]:
    return ["-O3", f"-march={os.environ.get(MARCH_ENV) or 'native'}", "-fopenmp", "-ffp-contract=off"]


def cache_dir() -> Path:
    key = hashlib.sha256(
        b"\0".join((*(source.read_bytes() for source in SOURCES), torch.__version__.encode(), cpu_flags().encode(),
                    " ".join(compile_flags()).encode()))
    ).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minerva" / "kernels")
    return root / f"cpu-{key}"


def load() -> NativeKernels | None:
    """`torch.ops.minerva_cpu` with the kernels registered, or None when they cannot be built here."""
    with _lock:
        if "ops" not in _state:
            _state["ops"], _state["reason"] = _build()
        return _state["ops"]


def require() -> NativeKernels:
    """`load()` for callers that run only where the kernels were built (a plan chose them)."""
    kernels = load()
    if kernels is None:
        raise RuntimeError(f"quantized CPU kernels unavailable: {unavailable_reason()}")
    return kernels


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]


def _build() -> tuple[NativeKernels | None, str | None]:
    if os.environ.get(SWITCH_ENV) == "0":
        return None, f"{SWITCH_ENV}=0"
    if platform.system() != "Linux":
        return None, f"native CPU kernels are built on Linux only (this is {platform.system()})"
    try:
        from torch.utils.cpp_extension import load as load_extension

        build_dir = cache_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        load_extension("minerva_cpu_kernels", [str(source) for source in SOURCES], extra_cflags=compile_flags(),
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False, verbose=False)
        log.info("CPU quantized kernels ready in %.1f s (%s)", time.perf_counter() - started, build_dir)
        return cast(NativeKernels, torch.ops.minerva_cpu), None  # built at run time: see kernels/cpu/native.py
    except Exception as exc:  # a missing compiler or ninja shows up as many exception types
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        log.warning("CPU quantized kernels unavailable, using dense weights: %s", reason)
        return None, reason
