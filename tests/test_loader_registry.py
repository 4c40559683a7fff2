"""ModelRegistry, compact ids, the batch check, and `minerva inspect`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.loader import ModelLoadError, ModelRegistry, check_models, read_model_info
from engine.loader import format_size
from server.cli import main


def write_gguf(path: Path, layers: int = 2) -> Path:
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("tiny qwen")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_token_list([f"t{i}" for i in range(20)])
    writer.add_tensor("token_embd.weight", np.ones((20, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_hf_dir(path: Path) -> Path:
    path.mkdir()
    config = {"model_type": "mistral", "hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 10, "max_position_embeddings": 32, "rope_theta": 1e6}  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 16, dtype=torch.bfloat16)}, path / "model.safetensors")
    return path


@pytest.fixture()
def models_dir(tmp_path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    write_gguf(folder / "qwen-tiny.gguf")
    write_hf_dir(folder / "mistral-tiny")
    (folder / "README.txt").write_text("not a model")
    (folder / "empty-folder").mkdir()
    return folder


def test_registry_from_directory(models_dir):
    registry = ModelRegistry()
    added = registry.add_directory(models_dir)
    assert [info.id for info in added] == ["mistral-tiny", "qwen-tiny"]
    assert registry.ids() == ["mistral-tiny", "qwen-tiny"] and len(registry) == 2 and "qwen-tiny" in registry
    mistral = registry.get("mistral-tiny")
    assert (mistral.architecture, mistral.format, mistral.quantization) == ("mistral", "hf_dir", "BF16")
    assert (mistral.layers, mistral.kv_heads, mistral.head_dim, mistral.rope_theta) == (3, 1, 8, 1e6)
    assert registry.get("qwen-tiny").architecture == "qwen2"
    assert [i.id for i in registry.infos()] == registry.ids()
    loaded = registry.open("qwen-tiny")
    assert torch.equal(loaded.tensors["token_embd.weight"].load(), torch.ones(20, 32))


def test_registry_errors(models_dir, tmp_path):
    registry = ModelRegistry()
    registry.add(models_dir / "qwen-tiny.gguf")
    with pytest.raises(ModelLoadError, match="duplicate model id 'qwen-tiny'"):
        registry.add(models_dir / "qwen-tiny.gguf")
    with pytest.raises(ModelLoadError, match="duplicate model id 'qwen-tiny'"):
        registry.add(models_dir / "mistral-tiny", model_id="qwen-tiny")
    registry.add(models_dir / "mistral-tiny", model_id="other")
    with pytest.raises(ModelLoadError, match="no such file"):
        registry.add(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="unknown model id.*known: other, qwen-tiny"):
        registry.get("nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        registry.add_directory(tmp_path / "no-such-dir")
    assert registry.ids() == ["qwen-tiny", "other"]


def test_compact_id_fields(models_dir):
    info = read_model_info(models_dir / "qwen-tiny.gguf")
    size = (models_dir / "qwen-tiny.gguf").stat().st_size
    assert info.compact_id == f"qwen-tiny|F32|{format_size(size)}|1|2|20"
    assert [format_size(n) for n in (812, 52_000, 3_400_000, 12_100_000_000)] == ["812B", "52.0KB", "3.4MB", "12.1GB"]


def test_check_models_reports_each_path(models_dir, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    results = check_models([models_dir / "qwen-tiny.gguf", broken, tmp_path / "missing", models_dir / "mistral-tiny"])
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[0].compact_id.startswith("qwen-tiny|F32|") and results[0].error is None
    assert str(broken) in results[1].error and "cannot fit" in results[1].error
    assert "no such file" in results[2].error and results[2].compact_id is None


def test_inspect_table_and_json(models_dir, capsys):
    assert main(["inspect", str(models_dir / "qwen-tiny.gguf"), str(models_dir / "mistral-tiny")]) == 0
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:4] == ["id", "format", "arch", "quant"] and len(rows) == 2
    assert rows[0].split()[:4] == ["qwen-tiny", "gguf", "qwen2", "F32"]
    assert main(["inspect", "--json", str(models_dir / "mistral-tiny")]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == read_model_info(models_dir / "mistral-tiny").to_dict()
    assert {"id", "format", "quantization", "file_size", "tensor_count", "compact_id"} <= set(record)


def test_inspect_bad_path_reports_and_fails(models_dir, tmp_path, capsys):
    shutil.copy(models_dir / "qwen-tiny.gguf", tmp_path / "copy.gguf")
    assert main(["inspect", str(tmp_path / "copy.gguf"), str(tmp_path / "nope.gguf")]) == 1
    captured = capsys.readouterr()
    assert "copy" in captured.out and f"{tmp_path / 'nope.gguf'}: no such file" in captured.err
