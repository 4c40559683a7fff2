"""The prototype's batch check: many paths in, one ok-or-error per path out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.loader.errors import ModelLoadError
from engine.loader.open import read_model_info


@dataclass(frozen=True)
class ModelCheck:
    """The outcome for one path of `check_models`: its compact id, or the error message."""

    path: str
    ok: bool
    compact_id: str | None = None
    error: str | None = None


def check_models(paths: Iterable[str | Path]) -> list[ModelCheck]:
    """Read each path's metadata and report ok (with the compact id) or the ModelLoadError, path by path."""
    results = []
    for path in paths:
        try:
            results.append(ModelCheck(str(path), True, compact_id=read_model_info(path).compact_id))
        except ModelLoadError as exc:
            results.append(ModelCheck(str(path), False, error=str(exc)))
    return results
