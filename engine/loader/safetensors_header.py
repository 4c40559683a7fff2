"""Bounds-checked safetensors headers and sharded-index reading; never touches tensor bytes.

Layout: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.loader.errors import ModelLoadError
from engine.loader.json_files import read_json_object

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class SafetensorsTensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, SafetensorsTensorInfo]
    metadata: dict[str, str]
    file_size: int


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate one .safetensors file's header; raises ModelLoadError naming file and problem."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            file_size = handle.seek(0, 2)
            if file_size < 8:
                raise ModelLoadError(path, f"safetensors truncated: {file_size} bytes, no header length")
            handle.seek(0)
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(file_size - 8, MAX_HEADER_BYTES):
                raise ModelLoadError(
                    path, f"safetensors header length {header_len} runs past the end of the {file_size}-byte file"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(path, f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ModelLoadError(path, "safetensors __metadata__ is not an object")
    data_start = 8 + header_len
    tensors = {name: _tensor(path, name, entry, data_start, file_size) for name, entry in header.items()}
    return SafetensorsHeader(path, tensors, metadata, file_size)


def _tensor(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> SafetensorsTensorInfo:  # entry: parsed JSON
    """Validate one header entry; called once per tensor, so the happy path does no string work."""
    problem = _entry_problem(entry)
    if problem is None:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        numel = 1
        for dim in shape:
            numel *= dim
        if end - begin != numel * DTYPE_SIZES[dtype]:
            problem = f"data_offsets span {end - begin} bytes but {dtype}{shape} needs {numel * DTYPE_SIZES[dtype]}"
        elif data_start + end > file_size:
            problem = f"data [{data_start + begin}, {data_start + end}) lies outside the {file_size}-byte file"
        else:
            return SafetensorsTensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    raise ModelLoadError(path, f"safetensors tensor {name!r}: {problem}")


def _entry_problem(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return "entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        return f"unknown dtype {dtype!r}"
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if not (type(offsets) is list and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        return f"data_offsets {offsets!r} is not [begin, end]"
    return None


def read_index(index_path: Path) -> dict[str, Path]:
    """Map tensor name -> shard file from a `model.safetensors.index.json`; checks that every shard exists."""
    weight_map = read_json_object(index_path, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(index_path, "index has no weight_map of tensor name -> shard file")
    shards: dict[str, Path] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_path.parent / shard_name
        if Path(shard_name).name != shard_name:
            raise ModelLoadError(index_path, f"shard {shard_name!r} is not a plain file name")
        if not shard.is_file():
            raise ModelLoadError(shard, f"shard listed in {index_path.name} is missing")
        shards[shard_name] = shard
    return {name: shards[shard] for name, shard in weight_map.items()}
