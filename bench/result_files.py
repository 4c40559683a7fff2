"""Where benchmarks keep their records: one JSON file each under bench/results/, read by docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(filename: str, record: dict[str, Any]) -> Path:
    """Write `record` to bench/results/`filename` (indented JSON, one trailing newline) and return its path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / filename
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
