"""ModelInfo: the metadata of one model, derived the same way from an HF-style config for every format."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from engine.loader.config_fields import read_field, rope_parameters, rope_type, text_config


@dataclass
class ModelInfo:
    """What GET /v1/models and `minerva inspect` show; never requires reading tensor bytes."""

    id: str
    path: str
    format: str  # "gguf" | "safetensors" | "hf_dir"
    architecture: str  # HF model_type: llama, mistral, qwen2, phi3, gpt_oss, ...
    quantization: str  # F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K/MXFP4/... or "mixed"
    quantization_breakdown: dict[str, int]  # tensor type -> parameter count
    parameters: int
    file_size: int  # bytes of the weight files
    tensor_count: int  # tensors as stored in the file(s)
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    experts: int | None
    active_experts: int | None
    rope_theta: float | None
    rope_scaling: dict[str, Any] | None
    chat_template: bool
    name: str | None = None  # display name, e.g. GGUF general.name

    @property
    def compact_id(self) -> str:
        """The prototype's one-line id `model|quant|size|tensors|layers|vocab`, e.g. `gpt-oss-20b|MXFP4|12.1GB|459|24|201088`."""
        fields = (self.id, self.quantization, format_size(self.file_size), self.tensor_count, self.layers,
                  self.vocab_size)
        return "|".join(str(value) for value in fields)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "compact_id": self.compact_id}


def format_size(num_bytes: int) -> str:
    """Decimal units with one decimal place: 12.1GB, 3.4MB, 52.0KB, 812B."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f}{unit}"
    return f"{num_bytes}B"


def rope_settings(config: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """(theta, scaling) for display: scaling is None for plain RoPE or an unreadable `rope_scaling`."""
    try:
        params = rope_parameters(config)
    except ValueError:
        return None, None
    theta = params.pop("rope_theta")
    scaling = params if rope_type(params) != "default" else None
    return (float(theta) if theta is not None else None), scaling


def summarize_quantization(tensor_types: list[tuple[str, int, int]]) -> tuple[str, dict[str, int]]:
    """Name a model's quantization from (type, ndim, parameters) per logical tensor.

    The type holding the majority of the weight-matrix parameters (ndim >= 2; norms and biases
    are F32 in every format) names the model: gpt-oss with BF16 or Q8_0 attention is "MXFP4",
    a Q4_K_M file is "Q4_K". With no majority it is "mixed"; the breakdown always has the counts.
    """
    breakdown: dict[str, int] = {}
    matrices: dict[str, int] = {}
    for kind, ndim, params in tensor_types:
        breakdown[kind] = breakdown.get(kind, 0) + params
        if ndim >= 2:
            matrices[kind] = matrices.get(kind, 0) + params
    deciding = matrices or breakdown
    if not deciding:
        return "unknown", {}
    top = max(deciding, key=deciding.__getitem__)
    name = top if 2 * deciding[top] > sum(deciding.values()) else "mixed"
    return name, dict(sorted(breakdown.items(), key=lambda item: -item[1]))


@overload
def _int(config: dict[str, Any], name: str, default: int) -> int: ...
@overload
def _int(config: dict[str, Any], name: str, default: None = None) -> int | None: ...
def _int(config: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = read_field(config, name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def info_from_config(
    config: dict[str, Any],
    *,
    model_id: str,
    path: Path,
    format: str,
    tensor_types: list[tuple[str, int, int]],
    file_size: int,
    tensor_count: int,
    chat_template: bool,
    name: str | None = None,
) -> ModelInfo:
    """Build ModelInfo from an HF config dict plus facts about the stored tensors."""
    text = text_config(config)
    hidden = _int(text, "hidden_size", default=0)
    heads = _int(text, "num_attention_heads", default=0)
    kv_heads = _int(text, "num_key_value_heads", default=heads)
    head_dim = _int(text, "head_dim", default=hidden // heads if heads else 0)
    theta, scaling = rope_settings(text)
    quantization, breakdown = summarize_quantization(tensor_types)
    return ModelInfo(
        id=model_id,
        path=str(path),
        format=format,
        architecture=str(config.get("model_type", "unknown")),
        quantization=quantization,
        quantization_breakdown=breakdown,
        parameters=sum(params for _, _, params in tensor_types),
        file_size=file_size,
        tensor_count=tensor_count,
        layers=_int(text, "num_hidden_layers", default=0),
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(text, "vocab_size", default=0),
        context_length=_int(text, "max_position_embeddings", default=0),
        experts=_int(text, "num_local_experts"),
        active_experts=_int(text, "num_experts_per_tok"),
        rope_theta=theta,
        rope_scaling=scaling,
        chat_template=chat_template,
        name=name,
    )
