"""The one reader of an HF-style config's architecture fields.

`ModelInfo` (metadata, lenient: an unknown architecture still has a size and a vocab) and
`ModelSpec` (shapes for the forward pass, strict: a bad field is an error) both take their
values from here, so a field's name, its aliases and its default live in one place.
"""

from __future__ import annotations

from typing import Any

# Canonical name -> the keys that may hold it, first found wins (GPT-2 and MoE variants included).
FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "num_hidden_layers": ("num_hidden_layers", "n_layer"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions"),
    "intermediate_size": ("intermediate_size",),
    "num_local_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "experts_per_token"),
}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's own config: `text_config` in multimodal checkpoints, else the config itself."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def read_field(config: dict[str, Any], name: str) -> Any:
    """The raw value of a canonical field (None when absent), unvalidated: callers decide how strict to be."""
    for key in FIELD_KEYS[name]:
        if config.get(key) is not None:
            return config[key]
    return None


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the classic `rope_theta` + `rope_scaling` pair, as one dict.

    `rope_theta` is None when the config does not say; ValueError for a `rope_scaling` that is not an object.
    """
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    scaling = config.get("rope_scaling") or (params if isinstance(params, dict) else None) or {}
    if not isinstance(scaling, dict):
        raise ValueError(f"config field 'rope_scaling' must be an object, got {scaling!r}")
    return {"rope_theta": config.get("rope_theta"), **scaling}


def rope_type(params: dict[str, Any]) -> str:
    return str(params.get("rope_type") or params.get("type") or "default")
