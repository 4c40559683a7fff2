"""Start-up: the context that fits by itself, the CPU KV budget, and broken inputs that end in one
`error:` line (exit 2), never a traceback."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.assets import tiny_gpt_oss_gguf
from engine.config import ConfigError, EngineConfig
from engine.kv_budget import available_memory_bytes, kv_cache_blocks
from engine.builder import build_engine
from engine_testing import make_engine, tiny_llama_dir
from server.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def engine_log(caplog):
    """Records of the `engine` loggers, wherever an earlier test pointed their handlers."""
    logger = logging.getLogger("engine")
    saved = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="engine")
    yield caplog
    logger.propagate = saved


def test_context_shrinks_to_the_kv_cache_when_not_asked_for(engine_log):
    engine = make_engine(num_blocks=5, block_size=4)  # the tiny Llama's context is 256 tokens
    assert engine.max_model_len == 20
    (record,) = [r for r in engine_log.records if r.name == "engine.kv_budget"]
    assert "context of 20 tokens, not the model's 256" in record.getMessage()
    assert "--kv-cache-gib" in record.getMessage()
    assert make_engine(num_blocks=64, block_size=4).max_model_len == 256  # fits: the model's own context


def test_an_explicit_context_that_does_not_fit_is_an_error_naming_the_flags():
    with pytest.raises(ConfigError, match="--max-model-len") as error:
        make_engine(num_blocks=5, block_size=4, max_model_len=64)
    assert "--kv-cache-gib" in str(error.value) and "--gpu-memory-utilization" in str(error.value)


def test_cpu_kv_budget_defaults_to_a_share_of_memory_capped_by_what_sequences_can_use():
    engine = make_engine(kv_cache_gib=None, max_num_seqs=3)
    per_seq = -(-engine.max_model_len // engine.config.block_size)
    assert engine.pool.num_blocks == 3 * per_seq  # the tiny model: capped by max_num_seqs full sequences
    blocks = kv_cache_blocks(engine.model, EngineConfig(model=str(tiny_llama_dir())), 256, max_num_seqs=10**6)
    per_block = 2 * engine.model.num_layers * 16 * engine.model.num_kv_heads * engine.model.head_dim * 4
    assert 0 < blocks * per_block <= 0.10 * available_memory_bytes() * 1.05  # memory-bound: about 10% of it


# --- broken inputs: one line on stderr, exit status 2 ------------------------------------------------------


def _copy_llama(tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir(), tmp_path / "model"))


def _edit_config(tmp_path: Path, **changes) -> Path:
    folder = _copy_llama(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _drop_tensor(tmp_path: Path) -> Path:
    folder = _copy_llama(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    return folder


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _truncated_safetensors(tmp_path: Path) -> Path:
    folder = _copy_llama(tmp_path)
    _truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size // 2)
    return folder


def _truncated_gguf(tmp_path: Path) -> Path:
    path = Path(shutil.copy(tiny_gpt_oss_gguf(), tmp_path / "tiny.gguf"))
    return _truncate(path, path.stat().st_size - 1000)


def _broken_tokenizer(tmp_path: Path) -> Path:
    folder = _copy_llama(tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return folder


def _bad_toml(tmp_path: Path) -> list[str]:
    (tmp_path / "bad.toml").write_text("[engine\nblock_size = 16\n")
    return ["--config", str(tmp_path / "bad.toml")]


BROKEN = {
    "unknown architecture": (lambda p: [str(_edit_config(p, model_type="bert", architectures=["BertModel"]))],
                             "bert"),
    "missing tensor": (lambda p: [str(_drop_tensor(p))], "model.layers.1.mlp.down_proj.weight"),
    "shape mismatch": (lambda p: [str(_edit_config(p, intermediate_size=96))], "shape"),
    "truncated safetensors": (lambda p: [str(_truncated_safetensors(p))], "model.safetensors"),
    "truncated gguf": (lambda p: [str(_truncated_gguf(p))], "tiny.gguf"),
    "broken tokenizer.json": (lambda p: [str(_broken_tokenizer(p))], "tokenizer.json"),
    "no such model": (lambda p: [str(p / "nowhere.gguf")], "no such file"),
    "bad toml": (lambda p: [str(tiny_llama_dir()), *_bad_toml(p)], "bad.toml"),
    "bad kernel backend in toml": (
        lambda p: [str(tiny_llama_dir()), "--config", str(_write(p / "k.toml", '[engine]\nkernel_backend = "cuda"\n'))],
        "kernel_backend"),
    "gpu memory utilization over 1": (lambda p: [str(tiny_llama_dir()), "--gpu-memory-utilization", "1.5"],
                                      "gpu_memory_utilization"),
    "context over the KV cache": (lambda p: ["tiny-gpt-oss", "--kv-cache-gib", "0.0001", "--max-model-len", "512"],
                                  "--max-model-len"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_is_one_error_line_and_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("server.launch.configure_json_logging", lambda level: None)
    make_args, expected = BROKEN[case]
    args = make_args(tmp_path)
    capsys.readouterr()  # what building the broken input printed
    assert main(["serve", "--device", "cpu", "--kv-cache-gib", "0.01", *args]) == 2  # the last flag given wins
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err and "Traceback" not in err


@pytest.mark.parametrize("flag", [["--max-model-len", "0"], ["--block-size", "x"], ["--dtype", "float8"],
                                  ["--kv-cache-gib", "-1"], ["--allowed-origins", "[1, 2]"]])
def test_bad_flag_values_are_usage_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "m", *flag])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag[0]}" in err and "Traceback" not in err


def test_a_real_process_prints_no_traceback(tmp_path):
    """The subprocess view of one broken model: what a user at a terminal sees."""
    folder = _edit_config(tmp_path, model_type="bert", architectures=["BertModel"])
    result = subprocess.run([sys.executable, "-m", "server.cli", "serve", str(folder), "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_weight_loading_reports_progress_up_to_every_byte():
    import io

    from server.load_progress import LoadProgress

    calls = []
    build_engine(EngineConfig(model=str(tiny_llama_dir()), kv_cache_gib=0.01),
                          on_progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert total == (tiny_llama_dir() / "model.safetensors").stat().st_size - 8 - _header_bytes(tiny_llama_dir())
    assert calls[-1][0] == total and [d for d, _ in calls] == sorted(d for d, _ in calls)
    stream = io.StringIO()
    bar = LoadProgress("tiny", stream)
    bar(total // 2, total)
    bar(total, total)
    assert stream.getvalue().startswith("\rloading tiny [") and stream.getvalue().endswith("MiB\n")


def _header_bytes(folder: Path) -> int:
    import struct

    with open(folder / "model.safetensors", "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


def test_banner_names_url_context_kv_tokens_device_and_kernels():
    from engine.async_engine import AsyncEngine
    from server.serving import banner_lines

    engine = AsyncEngine.from_config(EngineConfig(model=str(tiny_llama_dir()), device="cpu", kv_cache_gib=0.01))
    (line,) = banner_lines({"tiny": engine}, "http://127.0.0.1:8000")
    tokens = engine.engine.pool.num_blocks * 16
    assert line == (f"Minerva serving 'tiny' at http://127.0.0.1:8000/v1: context 256 tokens, KV cache {tokens} "
                    "tokens (float32), device cpu, float32, cpu kernels")  # head_dim 16: no fp16 attention kernel
