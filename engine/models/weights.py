"""WeightReader: fetch named tensors from a loader TensorStore with shape checks and clear errors.

Architectures ask for tensors by their HF name; a per-format `rename` (identity for
safetensors, llama.cpp's names for GGUF) maps it to the file's own name. Every missing
or misshapen tensor is a ModelConfigError naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.loader.tensors import LazyTensor, TensorStore
from engine.models.errors import ModelConfigError
from kernels.cpu.quant import QuantizedWeight
from kernels.mxfp4 import MXFP4Tensor

# What the kernels make of a GGUF tensor's stored blocks (raw bytes, type, shape): a weight they read
# quantized, or None to load it dense (kernels.ops.Ops.quantized_weight).
KeepQuantized = Callable[[torch.Tensor, str, tuple[int, ...]], QuantizedWeight | None]
LoadedWeight = torch.Tensor | QuantizedWeight  # a matmul weight as `WeightReader.weight` reads it


class WeightReader:
    def __init__(
        self,
        tensors: TensorStore,
        device: torch.device,
        dtype: torch.dtype,
        rename: Callable[[str], str] = lambda name: name,
        unpack_mxfp4: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        keep_quantized: KeepQuantized | None = None,
    ) -> None:
        self.tensors = tensors
        self.device = device
        self.dtype = dtype
        self.rename = rename
        self.unpack_mxfp4 = unpack_mxfp4
        self.on_progress = on_progress  # (bytes read so far, bytes of all tensors): a load progress bar
        self.keep_quantized = keep_quantized if device.type == "cpu" else None
        self._total_bytes = sum(t.nbytes for t in tensors.values()) if on_progress else 0
        self._read_bytes = 0

    def _count(self, *stored: str) -> None:
        if self.on_progress is not None:
            self._read_bytes += sum(self.tensors[name].nbytes for name in stored if name in self.tensors)
            self.on_progress(self._read_bytes, self._total_bytes)

    def _lazy(self, name: str) -> LazyTensor:
        stored = self.rename(name)
        if stored not in self.tensors:
            shown = name if stored == name else f"{name} (stored as {stored})"
            raise ModelConfigError(f"missing tensor {shown}")
        return self.tensors[stored]

    def has(self, name: str) -> bool:
        return self.rename(name) in self.tensors

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` of exactly `shape`, on the model's device, in `dtype` (default the model's)."""
        lazy = self._lazy(name)
        if tuple(lazy.shape) != tuple(shape):
            raise ModelConfigError(f"tensor {self.rename(name)} has shape {tuple(lazy.shape)}, expected {tuple(shape)}")
        tensor = lazy.load()
        self._count(self.rename(name))
        return tensor.to(device=self.device, dtype=dtype or self.dtype, copy=tensor.device == self.device)

    def weight(self, name: str, shape: tuple[int, ...]) -> LoadedWeight:
        """A matmul weight: as `get`, except that a quantized GGUF tensor the kernels read in place stays quantized."""
        lazy = self._lazy(name)
        if self.keep_quantized is None or not lazy.is_quantized or tuple(lazy.shape) != tuple(shape):
            return self.get(name, shape)
        raw, type_name = lazy.raw()
        kept = self.keep_quantized(raw, type_name, tuple(lazy.shape))
        if kept is None:
            return self.get(name, shape)
        self._count(self.rename(name))
        return kept

    def mxfp4(self, name: str, shape: tuple[int, ...]) -> MXFP4Tensor | torch.Tensor:
        """An MXFP4 weight of logical `shape` `[..., out, in]`: kept packed on the device, or, with
        `unpack_mxfp4`, dequantized once (exactly) to the model's dtype."""
        stored = self.rename(name)
        try:
            weight = self.tensors.mxfp4(stored)
        except KeyError as exc:
            raise ModelConfigError(f"missing MXFP4 tensor {stored} (or its _blocks/_scales pair)") from exc
        if tuple(weight.shape) != tuple(shape):
            raise ModelConfigError(f"MXFP4 tensor {stored} has shape {tuple(weight.shape)}, expected {tuple(shape)}")
        self._count(stored, f"{stored}_blocks", f"{stored}_scales")
        if self.unpack_mxfp4:
            return weight.dequantize(self.dtype).to(self.device)
        return weight.to(self.device)

    def is_mxfp4(self, name: str) -> bool:
        stored = self.rename(name)
        if stored in self.tensors:
            return self.tensors[stored].dtype_name == "MXFP4"
        return f"{stored}_blocks" in self.tensors and f"{stored}_scales" in self.tensors
