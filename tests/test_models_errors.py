"""Checkpoints that cannot run fail at build_model with a ModelConfigError naming the field or tensor."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from engine.loader import TensorStore, open_model
from engine.models import ModelConfigError, build_model
from model_factories import save_tiny_gpt_oss_mxfp4, save_tiny_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny_model("qwen2", path)
    return open_model(path)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    save_tiny_gpt_oss_mxfp4(path)
    return open_model(path)


def variant(loaded, config_changes=None, drop=(), replace=None):
    """`loaded` with some config fields changed, tensors dropped or swapped for other lazy tensors."""
    config = {**copy.deepcopy(loaded.config), **(config_changes or {})}
    tensors = {name: t for name, t in loaded.tensors.items() if name not in drop}
    tensors.update(replace or {})
    return SimpleNamespace(config=config, tensors=TensorStore(tensors, loaded.tensors.source), info=loaded.info)


def expect_error(loaded, *fragments: str) -> None:
    with pytest.raises(ModelConfigError) as err:
        build_model(loaded)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_the_unchanged_checkpoint_builds(llama, gpt_oss):
    assert build_model(variant(llama)).num_layers == 2
    assert build_model(variant(gpt_oss)).num_layers == 2


def test_unsupported_architecture(llama):
    expect_error(variant(llama, {"model_type": "gemma2"}), "unsupported architecture", "gemma2")


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"num_attention_heads": 5, "head_dim": None}, ("num_attention_heads (5) does not divide hidden_size (64)",)),
        ({"num_key_value_heads": 3}, ("num_attention_heads (4) is not a multiple of num_key_value_heads (3)",)),
        ({"vocab_size": 0}, ("vocab_size",)),
        ({"hidden_size": "64"}, ("hidden_size",)),
        ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "longrope"}}, ("rope", "longrope")),
        ({"layer_types": ["full_attention"]}, ("layer_types",)),
        ({"mlp_bias": True}, ("mlp_bias",)),
    ],
)
def test_inconsistent_config_fields(llama, changes, fragments):
    expect_error(variant(llama, changes), *fragments)


def test_config_disagreeing_with_tensors_names_the_tensor(llama):
    changed = variant(llama, {"intermediate_size": 96})
    expect_error(changed, "model.layers.0.mlp.gate_proj.weight", "(128, 64)", "(96, 64)")


def test_missing_tensor_is_named(llama):
    dropped = variant(llama, drop={"model.layers.1.self_attn.k_proj.bias"})
    expect_error(dropped, "missing tensor", "model.layers.1.self_attn.k_proj.bias")


def test_wrong_tensor_shape_is_named(llama):
    wrong = llama.tensors["model.layers.0.self_attn.v_proj.weight"]  # [16, 64] where q_proj needs [64, 64]
    replace = {"model.layers.0.self_attn.q_proj.weight": wrong}
    expect_error(variant(llama, replace=replace), "model.layers.0.self_attn.q_proj.weight", "(16, 64)")


def test_missing_or_misshapen_mxfp4_experts(gpt_oss):
    prefix = "model.layers.1.mlp.experts.down_proj"
    expect_error(variant(gpt_oss, drop={f"{prefix}_blocks", f"{prefix}_scales"}), prefix)
    expect_error(variant(gpt_oss, {"intermediate_size": 32}), "gate_up_proj", "expected (4, 64, 64)")


def test_kv_cache_binding_is_checked(llama):
    model = build_model(variant(llama))
    good = (torch.zeros(4, 8, model.num_kv_heads, model.head_dim),) * 2
    with pytest.raises(ModelConfigError, match="1 KV cache pairs for 2 layers"):
        model.bind_kv_caches([good])
    with pytest.raises(ModelConfigError, match="layer 1 KV cache shapes"):
        model.bind_kv_caches([good, (torch.zeros(4, 8, 3, model.head_dim),) * 2])
