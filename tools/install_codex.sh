#!/usr/bin/env bash
# Installs OpenAI's Codex CLI (npm @openai/codex) for the end-to-end test tests/test_codex.py. Needs node + npm.
set -euo pipefail
DIR=${CODEX_DIR:-$HOME/.cache/minerva/codex}
VERSION=${CODEX_VERSION:-0.171}
mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund "@openai/codex@$VERSION" >/dev/null
echo "$("$DIR/node_modules/.bin/codex" --version) installed: $DIR/node_modules/.bin/codex (tests/test_codex.py finds it there)"
