"""End to end with a real coding agent: `opencode run`, tools enabled, against `minerva serve` on SmolLM2-135M.

Skips (saying why) without the opencode binary (tools/install_opencode.sh installs it) or the
SmolLM2 weights. Slow on a CPU: OpenCode's ~10 KB system prompt is prefilled twice (title + answer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_fixtures import free_port_socket
from test_tool_loop_default_model import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def opencode_binary() -> str:
    candidates = [os.environ.get("MINERVA_OPENCODE"), shutil.which("opencode"),
                  str(Path(os.environ.get("OPENCODE_DIR", Path.home() / ".cache/minerva/opencode")) / "opencode")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("opencode is not installed: run tools/install_opencode.sh (or set MINERVA_OPENCODE)")


@pytest.fixture
def server(tmp_path):
    gguf = smollm2_gguf()
    with free_port_socket() as sock:
        port = sock.getsockname()[1]
    config = tmp_path / "engine.toml"
    config.write_text('[engine]\ndevice = "cpu"\ndtype = "float32"\nkernel_backend = "torch"\n'
                      "max_model_len = 8192\nkv_cache_gib = 0.5\n")
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", str(gguf), "--served-model-name",
                                "smollm2", "--port", str(port), "--config", str(config)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.5)
    yield base, tmp_path / "server.log"
    process.terminate()
    process.wait(timeout=60)
    log.close()


def test_opencode_run_with_tools_exits_zero(server, tmp_path):
    binary = opencode_binary()
    base, server_log = server
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    (work / "opencode.json").write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"minerva": {"npm": "@ai-sdk/openai-compatible", "name": "Minerva",
                                 "options": {"baseURL": base + "/v1"},
                                 "models": {"smollm2": {"name": "SmolLM2", "limit": {"context": 8192, "output": 32}}}}},
        "model": "minerva/smollm2",
    }))
    env = {**os.environ, "PWD": str(work), "HOME": str(home),  # opencode takes its project from $PWD "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_DATA_HOME": str(home / ".local/share"), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_STATE_HOME": str(home / ".local/state")}
    run = subprocess.run([binary, "run", "-m", "minerva/smollm2", "Say hello in one short sentence."], cwd=work,
                         env=env, capture_output=True, text=True, timeout=800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    requests = [json.loads(line) for line in server_log.read_text().splitlines()
                if line.startswith("{") and '"minerva.requests"' in line]
    chats = [r for r in requests if r["route"] == "/v1/chat/completions"]
    assert chats and all(r["status"] == 200 for r in chats), chats
    assert max(r["prompt_tokens"] for r in chats) > 1000  # the agent's full system prompt reached the model
