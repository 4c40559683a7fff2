"""Lazy tensor handles over memory-mapped files, and the TensorStore mapping that holds them.

A handle knows where its bytes lie; `load()` maps the file (once per file, shared) and
wraps the bytes with torch.frombuffer, so float tensors are zero-copy views of the page
cache. Quantized GGUF types dequantize through the gguf package on request.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.loader.errors import ModelLoadError
from kernels.mxfp4 import MXFP4Tensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32,
    "U64": torch.uint64, "BOOL": torch.bool,
}  # fmt: skip


class MappedFile:
    """One read-only mmap of a file, opened on first use and shared by all its tensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: mmap.mmap | None = None
        self._lock = threading.Lock()

    def buffer(self) -> mmap.mmap:
        with self._lock:
            if self._map is None:
                try:
                    with open(self.path, "rb") as handle:
                        self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(self.path, f"cannot map for reading: {exc}") from exc
            return self._map

    def tensor(self, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A zero-copy, read-only view of `count` items at `offset`; writing to it is not allowed."""
        if count == 0:
            return torch.empty(0, dtype=dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            try:
                return torch.frombuffer(self.buffer(), dtype=dtype, count=count, offset=offset)
            except ValueError as exc:  # the file shrank after its header was read
                raise ModelLoadError(self.path, f"tensor bytes at {offset} are no longer in the file: {exc}") from exc


@dataclass
class LazyTensor:
    """A tensor not yet read. `shape` is torch order and logical (dequantized) size."""

    name: str
    shape: tuple[int, ...]
    dtype_name: str  # "F32", "BF16", "U8", "Q8_0", "MXFP4", ...
    nbytes: int
    offset: int
    file: MappedFile

    @property
    def is_quantized(self) -> bool:
        return self.dtype_name not in TORCH_DTYPES

    def raw(self) -> tuple[torch.Tensor, str]:
        """The stored bytes as a flat uint8 view and the type name (for quantized GGUF: the raw blocks)."""
        return self.file.tensor(self.offset, self.nbytes, torch.uint8), self.dtype_name

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Materialise: zero-copy for stored torch dtypes, float32 for quantized types; cast if `dtype` is given."""
        if self.is_quantized:
            tensor = self._dequantize()
        else:
            stored = TORCH_DTYPES[self.dtype_name]
            tensor = self.file.tensor(self.offset, self.nbytes // stored.itemsize, stored).view(self.shape)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def _dequantize(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = _rows(self.shape)
        if rows == 0 or self.nbytes == 0:
            return torch.zeros(self.shape, dtype=torch.float32)
        raw, _ = self.raw()
        try:
            values = dequantize(raw.numpy().reshape(rows, self.nbytes // rows), GGMLQuantizationType[self.dtype_name])
        except (KeyError, NotImplementedError) as exc:
            raise ModelLoadError(self.file.path, f"tensor {self.name!r}: cannot dequantize {self.dtype_name}") from exc
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).view(self.shape)

    def load_mxfp4(self, device: torch.device | str | None = None) -> MXFP4Tensor:
        """A GGUF MXFP4 tensor repacked into the HF checkpoint's blocks/scales layout (see kernels.mxfp4).

        With `device`, the packed bytes move there first and the repack runs there (no host temporaries).
        """
        if self.dtype_name != "MXFP4":
            raise ModelLoadError(self.file.path, f"tensor {self.name!r} is {self.dtype_name}, not MXFP4")
        raw, _ = self.raw()
        return gguf_mxfp4_to_hf(raw if device is None else raw.to(device), self.shape)


def _rows(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape[:-1]:
        count *= dim
    return count


def gguf_mxfp4_to_hf(raw: torch.Tensor, shape: tuple[int, ...]) -> MXFP4Tensor:
    """GGUF's 17-byte block (scale, then low nibble = element j, high = j + 16) -> HF (low = 2j, high = 2j + 1)."""
    blocks = raw.view(*shape[:-1], shape[-1] // 32, 17)
    scales = blocks[..., 0].contiguous()
    packed = blocks[..., 1:]
    codes = torch.cat((packed & 0x0F, packed >> 4), dim=-1)  # element order 0..31
    hf_blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return MXFP4Tensor(hf_blocks.contiguous(), scales)


class TensorStore(Mapping[str, LazyTensor]):
    """The file's own tensor names -> LazyTensor, plus gpt-oss `{prefix}_blocks/_scales` pairs as MXFP4."""

    def __init__(self, tensors: dict[str, LazyTensor], source: Path) -> None:
        self._tensors = tensors
        self.source = source

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.source}: no tensor named {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def mxfp4(self, prefix: str) -> MXFP4Tensor:
        """The packed weight stored as `{prefix}_blocks` + `{prefix}_scales` (or one GGUF MXFP4 tensor `prefix`)."""
        if prefix in self._tensors and self._tensors[prefix].dtype_name == "MXFP4":
            return self._tensors[prefix].load_mxfp4()
        blocks, scales = self._tensors.get(f"{prefix}_blocks"), self._tensors.get(f"{prefix}_scales")
        if blocks is None or scales is None:
            raise KeyError(f"{self.source}: no MXFP4 tensor pair {prefix}_blocks/{prefix}_scales")
        try:
            return MXFP4Tensor(blocks.load(), scales.load())
        except ValueError as exc:
            raise ModelLoadError(self.source, f"MXFP4 pair {prefix!r}: {exc}") from exc
