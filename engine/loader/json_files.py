"""Reading the small JSON files beside the weights (config, index, tokenizer config) with a size cap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.loader.errors import ModelLoadError

MAX_JSON_BYTES = 64 * 1024 * 1024  # a real tokenizer_config.json is well under 1 MB


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """Parse `path` as a JSON object; any problem (missing, too large, malformed) is a ModelLoadError."""
    try:
        if not path.is_file():
            raise ModelLoadError(path, f"{what} is missing or not a regular file")
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelLoadError(path, f"{what} is {size} bytes, more than the {MAX_JSON_BYTES}-byte limit")
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read {what}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(path, f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path, f"{what} is not a JSON object")
    return data
