"""GGUF key-values -> the HF config.json dict a transformers model of that architecture would have.

Every format then derives ModelInfo (and the model runner its shapes) from one dict shape.
Rope settings are written both the classic way (`rope_theta`, `rope_scaling`) and as
transformers 5's `rope_parameters`, so either reader finds them.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from engine.loader.errors import ModelLoadError
from engine.loader.gguf_header import GGUFHeader

# GGUF general.architecture -> (HF model_type, HF architectures class name)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "phi3": ("phi3", "Phi3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gpt-oss": ("gpt_oss", "GptOssForCausalLM"),
}

T = TypeVar("T")
U = TypeVar("U")


def _require_int(header: GGUFHeader, key: str) -> int:
    value = header.fields.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelLoadError(header.path, f"GGUF key {key!r} is missing or not a positive integer (got {value!r})")
    return value


@overload
def _optional(header: GGUFHeader, key: str, kind: type[T]) -> T | None: ...
@overload
def _optional(header: GGUFHeader, key: str, kind: tuple[type[T], type[U]]) -> T | U | None: ...
def _optional(header: GGUFHeader, key: str, kind: type | tuple[type, ...]) -> object:
    """The key's value if it has the type `kind` (a bool is no int here), else None."""
    value = header.fields.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def gguf_to_hf_config(header: GGUFHeader) -> dict[str, Any]:
    """Translate the header's `{arch}.*`, `general.*` and `tokenizer.ggml.*` keys into an HF config dict."""
    arch = header.fields.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(header.path, "GGUF has no general.architecture")
    model_type, hf_class = ARCHITECTURES.get(arch, (arch.replace("-", "_"), ""))
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    hidden = _require_int(header, key("embedding_length"))
    heads = _require_int(header, key("attention.head_count"))
    layers = _require_int(header, key("block_count"))
    kv_heads = _optional(header, key("attention.head_count_kv"), int) or heads
    head_dim = _optional(header, key("attention.key_length"), int) or hidden // heads
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class] if hf_class else [],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": _vocab_size(header, arch),
        "max_position_embeddings": _optional(header, key("context_length"), int) or 0,
        "rms_norm_eps": _optional(header, key("attention.layer_norm_rms_epsilon"), float) or 1e-5,
        "tie_word_embeddings": "output.weight" not in {t.name for t in header.tensors},
        "bos_token_id": _optional(header, "tokenizer.ggml.bos_token_id", int),
        "eos_token_id": _optional(header, "tokenizer.ggml.eos_token_id", int),
        "pad_token_id": _optional(header, "tokenizer.ggml.padding_token_id", int),
    }
    intermediate = _optional(header, key("expert_feed_forward_length"), int) or _optional(
        header, key("feed_forward_length"), int
    )
    if intermediate:
        config["intermediate_size"] = intermediate
    experts = _optional(header, key("expert_count"), int)
    if experts:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = _optional(header, key("expert_used_count"), int) or 1
    config.update(_rope(header, arch, head_dim))
    config.update(_sliding_window(header, arch, layers))
    if model_type == "gpt_oss":
        config.update(hidden_act="silu", attention_bias=True, swiglu_limit=7.0)
    return config


def _vocab_size(header: GGUFHeader, arch: str) -> int:
    explicit = _optional(header, f"{arch}.vocab_size", int)
    if explicit:
        return explicit
    tokens = header.array_length("tokenizer.ggml.tokens")
    if tokens:
        return tokens
    embedding = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    return embedding.shape[0] if embedding else 0


def _rope(header: GGUFHeader, arch: str, head_dim: int) -> dict[str, Any]:
    theta = _optional(header, f"{arch}.rope.freq_base", (int, float))
    theta = float(theta) if theta else (150000.0 if arch == "gpt-oss" else 10000.0)
    scaling_type = _optional(header, f"{arch}.rope.scaling.type", str)
    factor = _optional(header, f"{arch}.rope.scaling.factor", (int, float))
    scaling: dict[str, Any] | None = None
    if scaling_type and scaling_type != "none" and factor:
        scaling = {"rope_type": scaling_type, "factor": float(factor)}
        original = _optional(header, f"{arch}.rope.scaling.original_context_length", int)
        if original:
            scaling["original_max_position_embeddings"] = original
        if scaling_type == "yarn":
            beta_fast = _optional(header, f"{arch}.rope.scaling.yarn_beta_fast", (int, float))
            beta_slow = _optional(header, f"{arch}.rope.scaling.yarn_beta_slow", (int, float))
            scaling["beta_fast"] = float(beta_fast) if beta_fast else 32.0
            scaling["beta_slow"] = float(beta_slow) if beta_slow else 1.0
            scaling["truncate"] = True  # llama.cpp always truncates the YaRN correction range
    rope_parameters = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    config: dict[str, Any] = {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": rope_parameters}
    rotary_dim = _optional(header, f"{arch}.rope.dimension_count", int)
    if rotary_dim and rotary_dim != head_dim:
        config["partial_rotary_factor"] = rotary_dim / head_dim
    return config


def _sliding_window(header: GGUFHeader, arch: str, layers: int) -> dict[str, Any]:
    window = _optional(header, f"{arch}.attention.sliding_window", int)
    if not window:
        return {"sliding_window": None}
    if arch == "gpt-oss":  # sliding attention on even layers, as transformers' GptOssConfig builds it
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        return {"sliding_window": window, "layer_types": layer_types}
    return {"sliding_window": window}
