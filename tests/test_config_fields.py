"""ModelInfo (metadata) and ModelSpec (shapes) read a config through one reader, so they agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.loader.config_fields import read_field, rope_parameters
from engine.loader.model_info import info_from_config
from engine.models.errors import ModelConfigError
from engine.models.spec import parse_spec

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 128, "intermediate_size": 96, "max_position_embeddings": 256,
         "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 64,
           "max_position_embeddings": 512, "num_local_experts": 4, "num_experts_per_tok": 2,
           "rope_parameters": {"rope_theta": 150000.0, "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "original_max_position_embeddings": 64, "truncate": False}}


def info(config: dict):
    return info_from_config(config, model_id="m", path=Path("m"), format="hf_dir", tensor_types=[], file_size=0,
                            tensor_count=0, chat_template=False)


@pytest.mark.parametrize("config", [LLAMA, GPT_OSS, {"text_config": LLAMA, "model_type": "llama"}],
                         ids=["llama", "gpt_oss", "nested"])
def test_info_and_spec_agree(config):
    meta, spec = info(config), parse_spec(config)
    assert (meta.hidden_size, meta.attention_heads, meta.kv_heads, meta.head_dim, meta.layers, meta.vocab_size) == (
        spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers, spec.vocab_size)
    assert (meta.experts or 0, meta.active_experts or 0) == (spec.num_experts, spec.experts_per_token)
    rope = rope_parameters(config.get("text_config", config))
    assert meta.rope_theta == rope.pop("rope_theta") and meta.rope_scaling == rope


def test_aliases_and_defaults():
    assert read_field({"n_embd": 8}, "hidden_size") == 8 and read_field({}, "hidden_size") is None
    assert info({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 3, "n_positions": 16}).layers == 3
    assert info({"model_type": "llama", "rope_theta": 1e4}).rope_scaling is None
    assert parse_spec({**LLAMA, "rope_theta": None, "rope_scaling": None}).rotary is not None  # default theta


def test_bad_rope_scaling_is_lenient_for_metadata_and_an_error_for_the_model():
    config = {**LLAMA, "rope_scaling": "yes"}
    assert info(config).rope_scaling is None
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        parse_spec(config)
