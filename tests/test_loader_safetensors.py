"""safetensors loading checked against transformers: tiny random Llama and GptOss models saved offline,
their configs as the truth for ModelInfo and their state dicts as the truth for every lazy tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.loader import detect_format, open_model, read_model_info
from kernels.mxfp4 import quantize

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def llama_config(**overrides):
    settings = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, rope_theta=50000.0, tie_word_embeddings=False,
    )  # fmt: skip
    settings.update(overrides)
    return transformers.LlamaConfig(**settings)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = transformers.LlamaForCausalLM(llama_config())
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return path, model


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True, rope_scaling=None))
    path = tmp_path_factory.mktemp("hf") / "tiny-sharded"
    model.save_pretrained(path, max_shard_size="30KB")
    return path, model


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny GptOss checkpoint in the official layout: MoE experts as MXFP4 `*_blocks` + `*_scales`."""
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        max_position_embeddings=512,
    )  # fmt: skip
    model = transformers.GptOssForCausalLM(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed = quantize(tensor.transpose(1, 2))  # checkpoint order [experts, out, in]
            state[f"{name}_blocks"], state[f"{name}_scales"] = packed.blocks, packed.scales
        else:
            state[name] = tensor.contiguous()
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt-oss"
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    saved = config.to_dict() | {"quantization_config": {"quant_method": "mxfp4"}}
    (path / "config.json").write_text(json.dumps(saved))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path, model


def assert_info_matches(info, config, model, path: Path) -> None:
    assert info.architecture == config.model_type and info.name is None
    assert info.layers == config.num_hidden_layers and info.hidden_size == config.hidden_size
    assert info.attention_heads == config.num_attention_heads and info.kv_heads == config.num_key_value_heads
    assert info.head_dim == config.head_dim and info.vocab_size == config.vocab_size
    assert info.context_length == config.max_position_embeddings
    assert info.rope_theta == config.rope_parameters["rope_theta"]
    assert info.parameters == model.num_parameters()
    files = sorted(path.glob("*.safetensors"))
    assert info.file_size == sum(f.stat().st_size for f in files)


def test_hf_dir_info_matches_config(llama_dir):
    path, model = llama_dir
    assert detect_format(path) == "hf_dir"
    info = read_model_info(path)
    assert_info_matches(info, model.config, model, path)
    assert (info.id, info.path, info.format, info.quantization) == ("tiny-llama", str(path), "hf_dir", "F32")
    assert info.tensor_count == len(model.state_dict())
    assert info.experts is None and info.active_experts is None and info.rope_scaling is None
    assert info.chat_template is True
    assert info.to_dict()["compact_id"] == f"tiny-llama|F32|{info.file_size / 1e3:.1f}KB|{info.tensor_count}|2|128"


def test_hf_dir_tensors_equal_state_dict(llama_dir):
    path, model = llama_dir
    loaded = open_model(path)
    state = model.state_dict()
    assert sorted(loaded.tensors) == sorted(state)
    for name, tensor in state.items():
        lazy = loaded.tensors[name]
        assert lazy.shape == tuple(tensor.shape) and lazy.dtype_name == "F32"
        assert torch.equal(lazy.load(), tensor)
    assert loaded.tensors["lm_head.weight"].load(torch.bfloat16).dtype == torch.bfloat16
    assert loaded.config == json.loads((path / "config.json").read_text())
    assert {"tokenizer_config.json", "generation_config.json"} <= set(loaded.tokenizer_files)
    assert loaded.gguf_fields is None


def test_single_safetensors_file_uses_config_beside_it(llama_dir):
    path, model = llama_dir
    weights = path / "model.safetensors"
    assert detect_format(weights) == "safetensors"
    info = read_model_info(weights, model_id="single")
    assert (info.id, info.path, info.format) == ("single", str(weights), "safetensors")
    assert_info_matches(info, model.config, model, path)


def test_sharded_dir_reads_every_shard(sharded_dir):
    path, model = sharded_dir
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    info = read_model_info(path)
    assert_info_matches(info, model.config, model, path)
    state = model.state_dict()
    loaded = open_model(path)
    assert info.tensor_count == len(loaded.tensors) == len(state) - 1  # the tied lm_head is not stored
    for name in loaded.tensors:
        assert torch.equal(loaded.tensors[name].load(), state[name])


def test_gpt_oss_mxfp4_layout(gpt_oss_dir):
    path, model = gpt_oss_dir
    config = model.config
    info = read_model_info(path)
    assert_info_matches(info, config, model, path)
    assert (info.architecture, info.quantization) == ("gpt_oss", "MXFP4")
    assert info.quantization_breakdown["MXFP4"] == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
    )
    assert (info.experts, info.active_experts) == (4, 2)
    assert info.rope_scaling["rope_type"] == "yarn" and info.rope_scaling["factor"] == 32.0
    assert info.chat_template is True


def test_gpt_oss_mxfp4_tensors_match_transformers_dequantization(gpt_oss_dir):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    path, model = gpt_oss_dir
    tensors = open_model(path).tensors
    state = model.state_dict()
    for layer in range(model.config.num_hidden_layers):
        for proj in ("gate_up_proj", "down_proj"):
            prefix = f"model.layers.{layer}.mlp.experts.{proj}"
            packed = tensors.mxfp4(prefix)
            blocks, scales = tensors[f"{prefix}_blocks"].load(), tensors[f"{prefix}_scales"].load()
            assert torch.equal(packed.blocks, blocks) and torch.equal(packed.scales, scales)
            reference = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=torch.float32)
            assert torch.equal(packed.dequantize().transpose(1, 2), reference)  # transformers' [E, in, out]
            original = state[prefix]
            block_max = original.transpose(1, 2).reshape(-1, 32).abs().amax(dim=1, keepdim=True)
            error = (reference.transpose(1, 2) - original.transpose(1, 2)).reshape(-1, 32).abs()
            assert (error <= 0.34 * block_max).all()
    with pytest.raises(KeyError, match="no MXFP4 tensor pair"):
        tensors.mxfp4("model.layers.0.self_attn.q_proj")
