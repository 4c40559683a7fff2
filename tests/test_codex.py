"""End to end with OpenAI's Codex CLI (`codex exec`, wire_api "responses") against Minerva's /v1/responses.

Codex streams every call, sends its tools (function tools, a `namespace` group, web_search), keeps no
server state (`store: false`) and asks for encrypted reasoning. Two runs:
- a scripted model that calls Codex's `exec_command` tool and then answers: Codex must run the command,
  send its output back, and print the answer;
- the default model (SmolLM2-135M) answering a prompt: Codex must exit 0 (slow on a CPU: Codex's
  system prompt and tools are ~4,600 tokens to prefill), or, when the model rambles to the context's end
  (Codex sends no temperature, so it samples at 1: about one run in four here), exit saying the response
  came back incomplete for max_output_tokens, which is the Responses API's answer for that case.
Skips (saying why) without the codex binary (tools/install_agents.sh installs it, or set MINERVA_CODEX).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from agent_binaries import agent_binary
from scripted_model import scripted_engine
from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama
from test_chat_tools import use_tool_template

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MARKER = "minerva-tool-ok"
CALL = '<tool_call>\n{"name": "exec_command", "arguments": {"cmd": "echo ' + MARKER + '"}}\n</tool_call>'
ANSWER = "The command printed it. Done."


def codex_binary() -> str:
    return agent_binary("codex", "MINERVA_CODEX", "Codex CLI")


def codex_exec(binary: str, base_url: str, model: str, prompt: str, tmp_path: Path,
               timeout: float) -> subprocess.CompletedProcess:
    """`codex exec` with a model_providers entry for Minerva, in scratch HOME / CODEX_HOME / work dirs."""
    home, work = tmp_path / "home", tmp_path / "work"
    for directory in (home / ".codex", work):
        directory.mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "minerva"\n\n[model_providers.minerva]\nname = "Minerva"\n'
        f'base_url = "{base_url}/v1"\nenv_key = "MINERVA_API_KEY"\nwire_api = "responses"\n')
    env = {**os.environ, "HOME": str(home), "CODEX_HOME": str(home / ".codex"), "MINERVA_API_KEY": "unused"}
    return subprocess.run([binary, "exec", "--skip-git-repo-check", prompt], cwd=work, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def scripted(tmp_path):
    """Writes CALL after the prompt's first assistant header, ANSWER once a tool result is in the prompt."""
    model_dir = use_tool_template(save_tiny_llama(tmp_path / "tiny"))
    engine = scripted_engine(model_dir, [CALL, ANSWER], sharpness=100.0, max_model_len=65536, num_blocks=8192)
    server = LiveServer(create_app({"scripted": engine}))
    yield server.base_url
    server.stop()


def test_codex_runs_the_tool_the_model_calls_and_prints_the_answer(scripted, tmp_path):
    run = codex_exec(codex_binary(), scripted, "scripted", "Run echo for me.", tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert MARKER in run.stderr + run.stdout  # the command ran (Codex shows its output)
    assert ANSWER in run.stdout


def test_codex_answers_a_prompt_with_the_default_model(tmp_path):
    from test_tool_loop_default_model import smollm2_gguf

    binary = codex_binary()
    engine = AsyncEngine.from_config(EngineConfig(model=str(smollm2_gguf()), served_model_name="smollm2",
                                                  device="cpu", max_model_len=8192, kv_cache_gib=0.5))
    server = LiveServer(create_app({"smollm2": engine}))
    try:
        run = codex_exec(binary, server.base_url, "smollm2", "Say hello in one short sentence.", tmp_path,
                         timeout=840)
    finally:
        server.stop()
    if run.returncode != 0:  # the model's luck, not the protocol's: Codex understood the incomplete response
        assert "Incomplete response returned, reason: max_output_tokens" in run.stderr, run.stderr[-3000:]
    else:
        assert run.stdout.strip()
