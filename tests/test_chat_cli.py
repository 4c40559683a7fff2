"""`minerva chat` driven through a pseudo-terminal, and `minerva generate` against a running server."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parents[1]


class Terminal:
    """A child process on a pty: what a person at a terminal would type and see."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen(argv, cwd=REPO, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120.0) -> str:
        """Everything printed up to and including the next `text` (after what was read before)."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen!r}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    assert text in self.seen, f"no {text!r} in {self.seen!r}"
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        code = self.process.wait(timeout=60)
        os.close(self.master)
        return code


def test_chat_in_a_terminal_streams_keeps_history_resets_and_exits():
    terminal = Terminal([sys.executable, "-m", "server.cli", "chat", "tiny-gpt-oss", "--device", "cpu",
                         "--max-tokens", "6", "--temperature", "0"])
    assert "Chatting with tiny-gpt-oss" in terminal.read_until("> ")
    terminal.type("Tell me about the sea.")
    first = terminal.read_until("> ")
    assert first.strip() and "error" not in first.lower()
    terminal.type("/reset")
    assert "(history cleared)" in terminal.read_until("> ")
    terminal.type("Tell me about the sea.")
    assert terminal.read_until("> ") == first  # greedy, same history (none): the same reply
    terminal.type("/exit")
    assert terminal.close() == 0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(create_app({"tiny": tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("gen") / "t"))}))
    yield server
    server.stop()


def test_generate_prints_what_the_openai_client_gets(live):
    prompt = "The quick brown fox"
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", prompt, "--url", live.base_url,
                             "--max-tokens", "8", "--temperature", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=8, temperature=0)
    assert result.stdout == answer.choices[0].message.content + "\n"


def test_generate_reports_server_errors_in_one_line(live):
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "hi", "nope", "--url", live.base_url],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "404" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "hi", "--url", "http://127.0.0.1:9"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: cannot reach")
