#!/usr/bin/env bash
# Installs the OpenCode coding agent (npm opencode-ai) for the end-to-end test tests/test_opencode.py.
# npm may skip its postinstall, so the platform binary is linked directly. Needs node + npm.
set -euo pipefail
DIR=${OPENCODE_DIR:-$HOME/.cache/minerva/opencode}
VERSION=${OPENCODE_VERSION:-1.18}
mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund "opencode-ai@$VERSION" >/dev/null
BIN=$(ls "$DIR"/node_modules/opencode-linux-*/bin/opencode 2>/dev/null | head -n 1 || true)
if [ -z "$BIN" ]; then
    echo "no opencode binary for this platform under $DIR/node_modules" >&2
    exit 1
fi
ln -sf "$BIN" "$DIR/opencode"
echo "opencode $("$DIR/opencode" --version) installed: $DIR/opencode (tests/test_opencode.py finds it there)"
