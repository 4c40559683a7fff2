"""Where the agent end-to-end tests find a coding agent's binary (tools/install_agents.sh puts them in .agents/)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def agent_binary(name: str, override: str, what: str) -> str:
    """The `name` binary from $`override`, MINERVA_AGENTS_DIR (default .agents/) or PATH; else skip, saying why."""
    agents = Path(os.environ.get("MINERVA_AGENTS_DIR", ROOT / ".agents"))
    for candidate in (os.environ.get(override), str(agents / "node_modules/.bin" / name), shutil.which(name)):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{what} is not installed: run tools/install_agents.sh (or set {override})")
