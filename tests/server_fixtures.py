"""Test helpers for the HTTP server: a tiny tokenizer with a chat template, a tiny Llama, a live uvicorn thread."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from engine.reports import EngineStats
from server.observability.request_log import LOGGER_NAME

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|developer|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Minerva serves language models over an OpenAI compatible API.",
    "Paged attention keeps the key value cache in fixed size blocks.",
    "Hello world! Streaming tokens arrive one chunk at a time.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ? ! ' \" @ # $ % ^ & _ ~",
]


# Byte-level symbols of printable ASCII, space and newline only: no token is a fragment of a multi-byte
# character, so any sequence a random model samples decodes to the same text token by token or all at once.
ASCII_ALPHABET = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]


def save_tokenizer(directory: Path, vocab_size: int = 320) -> int:
    """Train a byte-level BPE over ASCII on a few sentences and save it HF-style; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=ASCII_ALPHABET, limit_alphabet=len(ASCII_ALPHABET),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


def save_tiny_llama(directory: Path, max_position_embeddings: int = 256, num_layers: int = 2) -> Path:
    """A random Llama (2 layers unless said; weights scaled so greedy decoding varies) with the tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(directory)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                continue
            param.normal_(0.0, 1.0 if "embed" in name else 0.2)
    model.save_pretrained(directory)
    return directory


def free_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a background thread (lifespan included)."""

    def __init__(self, app, startup_timeout: float = 120.0) -> None:
        self._sock = free_port_socket()
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


def tiny_engine(model_dir: Path, name: str = "tiny"):
    """An AsyncEngine on the tiny Llama, fp32 on CPU with the torch kernels (not started); with
    MINERVA_TEST_ENGINE_PROCESS=1 a ProcessEngineClient instead, so the server tests run against
    `--engine-process` too."""
    from engine.client import start_engine
    from engine.config import EngineConfig

    return start_engine(EngineConfig(model=str(model_dir), served_model_name=name, device="cpu", dtype="float32",
                                     kernel_backend="torch", kv_cache_gib=0.02),
                        own_process=os.environ.get("MINERVA_TEST_ENGINE_PROCESS") == "1")


def wait_until_idle(engine, timeout: float = 20.0) -> EngineStats:
    """The engine's stats once nothing runs, waits or holds a KV block (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0:
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def request_logs(caplog, count: int = 1, timeout: float = 10.0, **fields: object) -> list[dict]:
    """The request log lines whose fields include `fields`, once `count` are written (or all there are at the
    timeout): the server writes a line after the response's last byte, so a client that has read a whole stream
    may be ahead of it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [dict(r.fields) for r in caplog.records if r.name == LOGGER_NAME
                 and all(r.fields.get(name) == value for name, value in fields.items())]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def child_pids(parent: int, marker: bytes) -> list[int]:
    """The processes whose parent is `parent` and whose command line holds `marker` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and marker in cmdline:
            found.append(int(entry.name))
    return found


def niceness(pid: int) -> int:
    """A process's nice value (read from /proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def deferred_niceness(core_pid: int) -> int:
    """The nice value an API process takes below its core's: API_PROCESS_NICENESS more, capped at the kernel's 19
    (a suite run under `nice -n 19` starts every process there)."""
    from server.serving import API_PROCESS_NICENESS

    return min(19, niceness(core_pid) + API_PROCESS_NICENESS)
