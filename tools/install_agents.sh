#!/usr/bin/env bash
# Installs the coding agents the end-to-end tests drive, from npm: OpenAI's Codex CLI (@openai/codex, calls
# POST /v1/responses) and Anthropic's Claude Code (@anthropic-ai/claude-code, calls POST /v1/messages).
# Usage: tools/install_agents.sh [DIR]   (default: .agents/ in the repository, which git ignores).
# The binaries land in DIR/node_modules/.bin/{codex,claude}; the tests look there (or at MINERVA_AGENTS_DIR).
# Versions: CODEX_VERSION and CLAUDE_CODE_VERSION (the ones tested here by default). Needs node + npm.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-${MINERVA_AGENTS_DIR:-$ROOT/.agents}}
CODEX_VERSION=${CODEX_VERSION:-0.171.0}
CLAUDE_CODE_VERSION=${CLAUDE_CODE_VERSION:-2.1.332}
command -v npm >/dev/null || { echo "npm is needed (install node.js 18 or newer)" >&2; exit 1; }
mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund \
    "@openai/codex@$CODEX_VERSION" "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null
for agent in codex claude; do
    "$DIR/node_modules/.bin/$agent" --version >/dev/null || { echo "$agent did not install under $DIR" >&2; exit 1; }
    echo "$agent $("$DIR/node_modules/.bin/$agent" --version | head -n 1): $DIR/node_modules/.bin/$agent"
done
