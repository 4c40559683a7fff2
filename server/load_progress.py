"""A one-line progress bar on a terminal while a model's weights load (nothing when stderr is a file or pipe)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class LoadProgress:
    """Called with (bytes read, bytes in all) as weights load; redraws at most ten times a second."""

    def __init__(self, name: str, stream: TextIO | None = None) -> None:
        self.name = name
        self.stream = stream or sys.stderr
        self._drawn_at = 0.0
        self._shown = False

    @classmethod
    def for_terminal(cls, name: str) -> "LoadProgress | None":
        return cls(name) if sys.stderr.isatty() else None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        filled = WIDTH * done // total if total else WIDTH
        self.stream.write(f"\rloading {self.name} [{'#' * filled}{'.' * (WIDTH - filled)}] "
                          f"{done / 2**20:.0f}/{total / 2**20:.0f} MiB")
        self._shown = True
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
