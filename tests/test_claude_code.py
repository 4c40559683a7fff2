"""End to end with Anthropic's Claude Code (`claude -p`, ANTHROPIC_BASE_URL at Minerva): it calls /v1/messages.

Skips (saying why) without the claude binary (tools/install_agents.sh installs it into .agents/).
The tool run uses a scripted model (Claude Code's ~50 KB prompt of system text and tool schemas is
too much for the test's speed on a real model): its first answer calls Claude Code's own Write tool,
its second, after the tool result, says it is done; the file on disk shows the call really ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer
from fake_model import FakeModel
from server.app import create_app
from server.settings import ServerSettings
from server_fixtures import LiveServer, save_tokenizer
from test_chat_tools import TOOL_TEMPLATE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parent.parent


def claude_binary() -> str:
    agents = Path(os.environ.get("MINERVA_AGENTS_DIR", ROOT / ".agents"))
    candidates = [os.environ.get("MINERVA_CLAUDE"), str(agents / "node_modules/.bin/claude"), shutil.which("claude")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("Claude Code is not installed: run tools/install_agents.sh (or set MINERVA_CLAUDE)")


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


class DecisiveModel(FakeModel):
    """FakeModel's one-hot logits scaled so that Claude Code's default temperature 1 still picks the scripted token."""

    def forward(self, *args):
        return super().forward(*args) * 1e4


@pytest.fixture
def scripted(tmp_path):
    """A model that answers a first turn with a Write call to tmp_path/work/hello.txt and any later turn with
    "Done." (it counts the assistant turns in its context), served with every model name falling back to it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_tokenizer(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    tokenizer = Tokenizer.from_files({name: model_dir / name for name in ("tokenizer.json", "tokenizer_config.json")})
    call = {"name": "Write", "arguments": {"file_path": str(tmp_path / "work" / "hello.txt"), "content": "hi"}}
    scripts = [tokenizer.encode(f"<tool_call>\n{json.dumps(call)}\n</tool_call>", add_special_tokens=False),
               tokenizer.encode("Done.", add_special_tokens=False)]
    assistant, eos = tokenizer.backend.token_to_id("<|assistant|>"), tokenizer.backend.token_to_id("</s>")

    def predict(context: list[int], vocab_size: int) -> int:
        turns = [i for i, token in enumerate(context) if token == assistant]
        script = scripts[min(len(turns), 2) - 1]
        written = len(context) - 1 - turns[-1]
        return script[written] if written < len(script) else eos

    info = SimpleNamespace(architecture="llama", path=str(model_dir), to_dict=lambda: {})
    llm = LLMEngine(DecisiveModel(tokenizer.vocab_size, predict), tokenizer,
                    EngineConfig(block_size=64, max_num_batched_tokens=16384), max_model_len=262144,
                    model_info=info, num_blocks=4200)
    server = LiveServer(create_app({"scripted": AsyncEngine(llm)}, ServerSettings(fallback_model="scripted")))
    yield server
    server.stop()


def test_claude_code_runs_the_tool_the_model_calls(scripted, tmp_path):
    run = run_claude(scripted.base_url, tmp_path / "work", "Write hi to hello.txt.", "--model", "claude-sonnet-4-5",
                     "--allowedTools", "Write", max_output=1000)  # the test tokenizer spends a token a character
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert (tmp_path / "work" / "hello.txt").read_text() == "hi"  # Claude Code ran the model's Write call
    assert "Done." in run.stdout
