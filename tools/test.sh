#!/usr/bin/env bash
# The test command: set up (idempotent, fast when done), lint and type-check, and run the whole suite.
# Kernels run on CPU under the Triton interpreter; CUDA-marked tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check  # engine/, server/, kernels/, bench/, tests/, tools/ (pyproject.toml [tool.ruff])
.venv/bin/python -m mypy  # the same packages and bench/ (pyproject.toml [tool.mypy])
exec .venv/bin/python -m pytest -q --timeout=600 "$@"
