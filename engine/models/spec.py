"""ModelSpec: the validated shapes and switches of a model, read once from its HF-style config dict.

Every format's loader produces the same config dict shape (GGUF included). The fields are read
by `engine.loader.config_fields` (the same reader ModelInfo uses); this is where they are
validated: a bad or missing field is a ModelConfigError here, before any tensor is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.layers.rotary import Rotary, build_rotary
from engine.loader.config_fields import read_field, text_config
from engine.loader.config_fields import rope_parameters as read_rope_parameters
from engine.models.errors import ModelConfigError

# HF model_type -> the forward-pass family that runs it.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "phi3": "llama", "gpt_oss": "gpt_oss"}


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # one per layer
    rotary: Rotary
    qkv_bias: bool
    o_bias: bool
    num_experts: int = 0
    experts_per_token: int = 0
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _positive_int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = read_field(config, key)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings with the family's default theta when the config gives none."""
    try:
        params = read_rope_parameters(config)
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None
    if params["rope_theta"] is None:
        params["rope_theta"] = 150000.0 if config.get("model_type") == "gpt_oss" else 10000.0
    return params


def _sliding_windows(config: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ModelConfigError(f"config field 'sliding_window' must be a positive integer or null, got {window!r}")
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise ModelConfigError(f"config field 'layer_types' must list one type per layer ({layers})")
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if model_type == "qwen2" and not config.get("use_sliding_window", False):
        window = None
    return (window,) * layers


def parse_spec(config: dict[str, Any]) -> ModelSpec:
    """Validate `config` and derive every shape the forward pass needs."""
    model_type = config.get("model_type")
    config = {**text_config(config), "model_type": model_type}
    if model_type not in FAMILIES:
        raise ModelConfigError(
            f"unsupported architecture (model_type {model_type!r}); supported: {', '.join(sorted(FAMILIES))}"
        )
    if config.get("mlp_bias"):
        raise ModelConfigError("config field 'mlp_bias' = true is not supported (no Llama-family MLP biases)")
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ModelConfigError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
    if read_field(config, "head_dim") is None and hidden % heads:
        raise ModelConfigError(f"num_attention_heads ({heads}) does not divide hidden_size ({hidden})")
    head_dim = _positive_int(config, "head_dim", hidden // heads)
    layers = _positive_int(config, "num_hidden_layers")
    partial = float(config.get("partial_rotary_factor", 1.0) or 1.0)
    params = rope_parameters(config)
    partial = float(params.get("partial_rotary_factor", partial))
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ModelConfigError(f"partial_rotary_factor {partial} gives an invalid rotary dim {rotary_dim}")
    try:
        rotary = build_rotary(params, rotary_dim, int(read_field(config, "max_position_embeddings") or 0))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelConfigError(f"config rope settings {params!r}: {exc}") from exc
    attention_bias = bool(config.get("attention_bias", False))
    is_moe = model_type == "gpt_oss"
    return ModelSpec(
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_positive_int(config, "vocab_size"),
        intermediate_size=_positive_int(config, "intermediate_size"),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(config, model_type, layers),
        rotary=rotary,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        num_experts=_positive_int(config, "num_local_experts") if is_moe else 0,
        experts_per_token=_positive_int(config, "num_experts_per_tok") if is_moe else 0,
        swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(config.get("swiglu_limit", 7.0)),
    )
