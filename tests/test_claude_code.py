"""End to end with Anthropic's Claude Code (`claude -p`, ANTHROPIC_BASE_URL at Minerva): it calls /v1/messages.

Skips (saying why) without the claude binary (tools/install_agents.sh installs it into .agents/).
The tool run uses a scripted model (Claude Code's ~50 KB prompt of system text and tool schemas is
too much for the test's speed on a real model): its first answer calls Claude Code's own Write tool,
its second, after the tool result, says it is done; the file on disk shows the call really ran.
The run against `minerva serve` on the default model (SmolLM2-135M) gives Claude Code a short system
prompt and no tools, so that the CPU prefill stays in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.config import EngineConfig
from agent_binaries import agent_binary
from scripted_model import scripted_engine
from server.app import create_app
from server.settings import ServerSettings
from server_fixtures import LiveServer, free_port_socket, save_tokenizer
from test_chat_tools import TOOL_TEMPLATE
from test_tool_loop_default_model import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent


def claude_binary() -> str:
    return agent_binary("claude", "MINERVA_CLAUDE", "Claude Code")


def run_claude(base_url: str, work: Path, prompt: str, *flags: str, max_output: int) -> subprocess.CompletedProcess:
    """`claude -p PROMPT FLAGS` in `work` with a scratch HOME; `max_output` caps each answer (the model's tokens)."""
    home = work.parent / "home"
    work.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "ANTHROPIC_BASE_URL": base_url, "ANTHROPIC_API_KEY": "unused",
           "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(max_output)}
    return subprocess.run([claude_binary(), "-p", prompt, *flags], cwd=work, env=env, capture_output=True, text=True,
                          timeout=800)


@pytest.fixture
def scripted(tmp_path):
    """A model that answers a first turn with a Write call to tmp_path/work/hello.txt and any later turn with
    "Done." (it counts the assistant turns in its context), served with every model name falling back to it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_tokenizer(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    call = {"name": "Write", "arguments": {"file_path": str(tmp_path / "work" / "hello.txt"), "content": "hi"}}
    engine = scripted_engine(model_dir, [f"<tool_call>\n{json.dumps(call)}\n</tool_call>", "Done."], sharpness=1e4,
                             config=EngineConfig(block_size=64, max_num_batched_tokens=16384),
                             max_model_len=262144, num_blocks=4200)
    server = LiveServer(create_app({"scripted": engine}, ServerSettings(fallback_model="scripted")))
    yield server
    server.stop()


def test_claude_code_runs_the_tool_the_model_calls(scripted, tmp_path):
    run = run_claude(scripted.base_url, tmp_path / "work", "Write hi to hello.txt.", "--model", "claude-sonnet-4-5",
                     "--allowedTools", "Write", max_output=1000)  # the test tokenizer spends a token a character
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "work" / "hello.txt").read_text() == "hi"  # Claude Code ran the model's Write call
    assert "Done." in run.stdout


def test_claude_code_answers_through_minerva_serve(tmp_path):
    """The default model under its own name, Claude Code's model id answered by --fallback-model.

    Claude Code samples at temperature 1 and SmolLM2 may ramble past the output cap: Claude Code then asks it
    to resume, and after a second cut it exits 1 saying the output token maximum was exceeded; that message
    is its reading of our `stop_reason: max_tokens`, so it counts as understood too."""
    claude_binary()
    smollm2_gguf()
    with free_port_socket() as sock:
        port = sock.getsockname()[1]
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--fallback-model",
                                    "smollm2-135m-instruct", "--port", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.5)
            run = run_claude(base, tmp_path / "work", "What is the capital of France? Answer in one sentence.",
                             "--model", "claude-sonnet-4-5", "--system-prompt", "You are a helpful assistant.",
                             "--tools", "", max_output=64)
        finally:
            process.terminate()
            process.wait(timeout=60)
    assert run.returncode == 0 or "output token maximum" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    requests = [json.loads(line) for line in log_path.read_text().splitlines()
                if line.startswith("{") and '"minerva.requests"' in line]
    messages = [r for r in requests if r["route"] == "/v1/messages"]
    assert messages and all(r["status"] == 200 and r["model"] == "smollm2-135m-instruct" for r in messages), messages
    assert all(r["completion_tokens"] > 0 for r in messages)
