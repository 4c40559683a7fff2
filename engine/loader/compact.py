"""The prototype's compact id `model|quant|size|tensors|layers|vocab` and the batch check of many paths."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.loader.model_info import ModelInfo


def format_size(num_bytes: int) -> str:
    """Decimal units with one decimal place: 12.1GB, 3.4MB, 52.0KB, 812B."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f}{unit}"
    return f"{num_bytes}B"


def compact_id(info: "ModelInfo") -> str:
    """One line per model, e.g. `gpt-oss-20b|MXFP4|12.1GB|459|24|201088`."""
    fields = (info.id, info.quantization, format_size(info.file_size), info.tensor_count, info.layers, info.vocab_size)
    return "|".join(str(field) for field in fields)


@dataclass(frozen=True)
class ModelCheck:
    """The outcome for one path of `check_models`: its compact id, or the error message."""

    path: str
    ok: bool
    compact_id: str | None = None
    error: str | None = None


def check_models(paths: Iterable[str | Path]) -> list[ModelCheck]:
    """Read each path's metadata and report ok (with the compact id) or the ModelLoadError, path by path."""
    from engine.loader.errors import ModelLoadError
    from engine.loader.open import read_model_info

    results = []
    for path in paths:
        try:
            results.append(ModelCheck(str(path), True, compact_id=read_model_info(path).compact_id))
        except ModelLoadError as exc:
            results.append(ModelCheck(str(path), False, error=str(exc)))
    return results
