"""A bounds-checked GGUF header parser: key-values and tensor infos, never tensor bytes.

gguf.GGUFReader trusts the counts it reads; this parser checks every count and length
against the bytes left in the file before acting on it, so a corrupt or hostile header
raises ModelLoadError instead of allocating or looping in proportion to a made-up number.
Large arrays (a 200k-token vocabulary) are skipped and decoded only when asked for.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.loader.errors import ModelLoadError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1 << 16
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_NESTING = 8

# GGUF value types: id -> struct format; 8 = string, 9 = array. (struct, not numpy: `minerva inspect`
# stays free of numpy's import time.)
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY, _BOOL, _FLOAT32 = 8, 9, 7, 6
_U64 = struct.Struct("<Q")
_STRUCTS: dict[str, struct.Struct] = {}
_DIMS = {n: struct.Struct(f"<{n}Q") for n in range(1, MAX_DIMS + 1)}
_TYPE_AND_OFFSET = struct.Struct("<IQ")
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

# GGML tensor types: id -> (name, elements per block, bytes per block); from ggml.h.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's place in the file; `shape` is in torch order (GGUF's dims reversed)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LazyArray:
    """A GGUF array value not yet decoded: where it lies and what it holds."""

    item_type: int
    count: int
    offset: int  # of the first element


@dataclass
class GGUFHeader:
    """Everything before the tensor data. `fields` holds scalars, short arrays, and LazyArray for long ones."""

    path: Path
    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int
    file_size: int

    def value(self, key: str, default: Any = None) -> Any:
        """A field decoded to Python, long arrays included."""
        raw = self.fields.get(key, default)
        if not isinstance(raw, LazyArray):
            return raw
        try:
            with open(self.path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Cursor(self.path, buf, raw.offset).array_items(raw.item_type, raw.count)
        except (OSError, ValueError) as exc:  # the file vanished or shrank since its header was read
            raise ModelLoadError(self.path, f"cannot read GGUF key {key!r}: {exc}") from exc

    def array_length(self, key: str) -> int | None:
        raw = self.fields.get(key)
        if isinstance(raw, LazyArray):
            return raw.count
        return len(raw) if isinstance(raw, list) else None

    def decoded_fields(self) -> "GGUFFields":
        return GGUFFields(self)


class GGUFFields(Mapping[str, Any]):
    """All key-values as Python values; a long array (the vocabulary) is decoded on first access, then kept."""

    def __init__(self, header: GGUFHeader) -> None:
        self._header = header
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._decoded:
            if key not in self._header.fields:
                raise KeyError(key)
            self._decoded[key] = self._header.value(key)
        return self._decoded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._header.fields)

    def __len__(self) -> int:
        return len(self._header.fields)


def shortest_float32(value: float) -> float:
    """The shortest decimal that round-trips as float32 (1e-05, not 9.99999974e-06), as numpy prints it."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.pack("<f", candidate) == packed:
            return candidate
    return value


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, path: Path, buf: mmap.mmap | bytes, pos: int = 0) -> None:
        self.path, self.buf, self.pos, self.end = path, buf, pos, len(buf)

    def fail(self, problem: str) -> ModelLoadError:
        return ModelLoadError(self.path, f"GGUF {problem} (at byte {self.pos})")

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.end:
            raise self.fail(f"truncated: {what} needs {nbytes} bytes, {self.end - self.pos} left")

    def scalar(self, fmt: str, what: str) -> Any:
        reader = _STRUCTS.get(fmt) or _STRUCTS.setdefault(fmt, struct.Struct(fmt))
        if self.pos + reader.size > self.end:
            raise self.fail(f"truncated: {what} needs {reader.size} bytes, {self.end - self.pos} left")
        (value,) = reader.unpack_from(self.buf, self.pos)
        self.pos += reader.size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        length = self.scalar("<Q", "string length")
        if limit is not None and length > limit:
            raise self.fail(f"{what} length {length} exceeds {limit}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int, lazy_from: int, depth: int = 0) -> Any:
        """Read one value; arrays with more than `lazy_from` items come back as LazyArray."""
        if value_type in _SCALARS:
            value = self.scalar(_SCALARS[value_type], "value")
            if value_type == _FLOAT32:
                return shortest_float32(value)
            return bool(value) if value_type == _BOOL else value
        if value_type == _STRING:
            return self.string("string value")
        if value_type != _ARRAY:
            raise self.fail(f"unknown value type {value_type}")
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"arrays nested deeper than {MAX_ARRAY_NESTING}")
        item_type = self.scalar("<I", "array item type")
        count = self.scalar("<Q", "array length")
        start = self.pos
        self._skip_items(item_type, count, depth + 1)
        if count > lazy_from:
            return LazyArray(item_type, count, start)
        return _Cursor(self.path, self.buf, start).array_items(item_type, count)

    def _skip_items(self, item_type: int, count: int, depth: int) -> None:
        if item_type in _SCALARS:
            self.need(count * struct.calcsize(_SCALARS[item_type]), f"array of {count} items")
            self.pos += count * struct.calcsize(_SCALARS[item_type])
        elif item_type == _STRING:
            self.need(count * 8, f"array of {count} strings")
            self._skip_strings(count)
        elif item_type == _ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise self.fail(f"arrays nested deeper than {MAX_ARRAY_NESTING}")
            self.need(count * 12, f"array of {count} arrays")
            for _ in range(count):
                inner_type = self.scalar("<I", "array item type")
                self._skip_items(inner_type, self.scalar("<Q", "array length"), depth + 1)
        else:
            raise self.fail(f"unknown array item type {item_type}")

    def _skip_strings(self, count: int) -> None:
        """The hot loop of a 200k-token vocabulary: lengths only, nothing decoded."""
        buf, pos, end, length_at = self.buf, self.pos, self.end, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail("truncated: string length runs past the end of the file")
            pos += 8 + length_at(buf, pos)[0]
        if pos > end:
            raise self.fail("truncated: string runs past the end of the file")
        self.pos = pos

    def array_items(self, item_type: int, count: int) -> list[Any]:
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            size = struct.calcsize(fmt)
            self.need(count * size, f"array of {count} items")
            items = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
            self.pos += count * size
            return items
        if item_type == _STRING:
            return self._strings(count)
        if item_type == _ARRAY:
            return [self.value(_ARRAY, lazy_from=1 << 62, depth=1) for _ in range(count)]
        raise self.fail(f"unknown array item type {item_type}")

    def _strings(self, count: int) -> list[str]:
        """Decode a string array in one tight loop (a vocabulary has 10^5..10^6 of them)."""
        buf, pos, end, length_at = self.buf, self.pos, self.end, _U64.unpack_from
        items = []
        for _ in range(count):
            if pos + 8 > end:
                self.pos = pos
                raise self.fail("truncated: string length runs past the end of the file")
            length = length_at(buf, pos)[0]
            pos += 8
            if pos + length > end:
                self.pos = pos
                raise self.fail("truncated: string runs past the end of the file")
            items.append(buf[pos : pos + length].decode("utf-8", errors="replace"))
            pos += length
        self.pos = pos
        return items


def read_gguf_header(path: str | Path, lazy_arrays_from: int = 64) -> GGUFHeader:
    """Parse and validate a GGUF file's header; raises ModelLoadError naming the file and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = handle.seek(0, 2)
            if file_size < 24:
                raise ModelLoadError(path, f"GGUF truncated: {file_size} bytes is shorter than a header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, file_size, lazy_arrays_from)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc


def _parse(path: Path, buf: mmap.mmap, file_size: int, lazy_from: int) -> GGUFHeader:
    cur = _Cursor(path, buf)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise ModelLoadError(path, f"not a GGUF file: magic {magic!r}, expected {MAGIC!r}")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"version {version} is not supported (only {SUPPORTED_VERSIONS})")
    tensor_count = cur.scalar("<Q", "tensor count")
    kv_count = cur.scalar("<Q", "key-value count")
    if kv_count * _MIN_KV_BYTES > file_size - cur.pos:
        raise cur.fail(f"key-value count {kv_count} cannot fit in a {file_size}-byte file")
    if tensor_count * _MIN_TENSOR_INFO_BYTES > file_size - cur.pos:
        raise cur.fail(f"tensor count {tensor_count} cannot fit in a {file_size}-byte file")
    fields: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("key", limit=MAX_NAME_BYTES)
        if key in fields:
            raise cur.fail(f"duplicate key {key!r}")
        fields[key] = cur.value(cur.scalar("<I", "value type"), lazy_from)
    infos = [_tensor_info(cur) for _ in range(tensor_count)]
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = [_place(path, info, data_offset, alignment, file_size) for info in infos]
    names = {t.name for t in tensors}
    if len(names) != len(tensors):
        raise ModelLoadError(path, "GGUF has duplicate tensor names")
    return GGUFHeader(path, version, fields, tensors, data_offset, file_size)


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor-info record; the hot path of a 459-tensor header, so no per-call string formatting."""
    name = cur.string("tensor name", limit=MAX_NAME_BYTES)
    n_dims = cur.scalar("<I", "tensor dim count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dims (1..{MAX_DIMS} allowed)")
    cur.need(8 * n_dims + _TYPE_AND_OFFSET.size, "tensor dims, type and offset")
    dims = _DIMS[n_dims].unpack_from(cur.buf, cur.pos)
    type_id, offset = _TYPE_AND_OFFSET.unpack_from(cur.buf, cur.pos + 8 * n_dims)
    cur.pos += 8 * n_dims + _TYPE_AND_OFFSET.size
    return name, dims, type_id, offset


def _place(path: Path, info: tuple[str, tuple[int, ...], int, int], data_offset: int, alignment: int, file_size: int) -> GGUFTensorInfo:
    name, dims, type_id, offset = info
    if type_id not in GGML_TYPES:
        raise ModelLoadError(path, f"GGUF tensor {name!r} has unknown quant type {type_id}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if dims[0] % block:
        raise ModelLoadError(path, f"GGUF tensor {name!r}: row of {dims[0]} is not a multiple of {type_name}'s block {block}")
    numel = 1
    for dim in dims:
        numel *= dim
    nbytes = numel // block * block_bytes
    start = data_offset + offset
    if offset % alignment:
        raise ModelLoadError(path, f"GGUF tensor {name!r} offset {offset} is not aligned to {alignment}")
    if start + nbytes > file_size:
        raise ModelLoadError(
            path, f"GGUF tensor {name!r} data [{start}, {start + nbytes}) lies outside the {file_size}-byte file"
        )
    return GGUFTensorInfo(name, tuple(reversed(dims)), type_id, type_name, start, nbytes)
