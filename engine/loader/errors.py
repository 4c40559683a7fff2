"""The one error type every loader failure raises, so callers catch a single thing."""

from __future__ import annotations

from pathlib import Path

from engine.errors import MinervaError


class ModelLoadError(MinervaError):
    """A model path is missing, malformed or unsupported; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")
