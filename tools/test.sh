#!/usr/bin/env bash
# The test command: set up (idempotent, fast when done) and run the whole suite.
# Kernels run on CPU under the Triton interpreter; CUDA-marked tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec .venv/bin/python -m pytest -q --timeout=600 "$@"
