#!/usr/bin/env bash
# The whole GPU check (kernel tests, kernel benchmarks, gpt-oss-20b decode) in one command;
# the report lands in bench/results/gpu-<device>-<date>.{md,json}. Extra args go to bench.gpu_suite.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    bash tools/setup.sh || echo "tools/setup.sh failed; running with the system python" >&2
fi
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
exec "$PY" -m bench.gpu_suite "$@"
