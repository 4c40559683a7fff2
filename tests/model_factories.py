"""Tiny random transformers models saved to disk, for tests across the project.

`save_tiny_model(kind, path)` builds a fp32 `LlamaForCausalLM` / `MistralForCausalLM` /
`Qwen2ForCausalLM` / `Phi3ForCausalLM` / `GptOssForCausalLM` (hidden 64, vocab 256) offline and
`save_pretrained`s it. Weights follow PEERS.md's advice (embeddings std 1, the rest std 0.2) so
greedy continuations vary. `save_tiny_gpt_oss_mxfp4(path)` writes gpt-oss with its experts
quantized to MXFP4 in the official checkpoint layout and returns the transformers model whose
experts hold the dequantized values, the reference for that checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kernels.mxfp4 import quantize

KINDS = ("llama", "llama3", "mistral", "qwen2", "phi3", "gpt_oss")

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(kind: str, **overrides):
    """The transformers config of a tiny random `kind` model (see KINDS)."""
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **overrides})
    if kind == "llama3":
        rope = {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
        }  # fmt: skip
        return tf.LlamaConfig(**{**_COMMON, "rope_parameters": rope, **overrides})
    if kind == "mistral":
        return tf.MistralConfig(**{**_COMMON, "sliding_window": 6, "head_dim": 16, **overrides})
    if kind == "qwen2":
        return tf.Qwen2Config(**{**_COMMON, "num_key_value_heads": 1, **overrides})
    if kind == "phi3":
        return tf.Phi3Config(**{**_COMMON, "partial_rotary_factor": 0.5, **overrides})
    if kind == "gpt_oss":
        rope = {
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 64,
        }  # fmt: skip
        params = {
            **_COMMON, "intermediate_size": 64, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
            "sliding_window": 5, "rope_parameters": rope, "max_position_embeddings": 256, **overrides,
        }  # fmt: skip
        return tf.GptOssConfig(**params)
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")


def tiny_model(kind: str, seed: int = 0, weight_std: float = 0.2, **overrides) -> torch.nn.Module:
    """A random fp32 transformers causal LM of `kind`, in eval mode with eager attention.

    Embeddings get std 1, norms ~1, every other weight `weight_std`.
    """
    import transformers as tf

    config = tiny_config(kind, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.uniform_(0.8, 1.2)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, weight_std)
    return model


def save_tiny_model(
    kind: str, path: str | Path, seed: int = 0, weight_std: float = 0.2, **overrides
) -> torch.nn.Module:
    """Build a tiny random model, `save_pretrained` it (fp32 safetensors) to `path`, and return it."""
    model = tiny_model(kind, seed, weight_std, **overrides)
    model.save_pretrained(path)
    return model


def save_tiny_gpt_oss_mxfp4(path: str | Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """gpt-oss with MXFP4 experts in the official layout (`*_blocks` [E, out, in/32, 16], `*_scales`).

    Returns the transformers model with its expert weights replaced by the dequantized MXFP4 values,
    i.e. exactly what the saved checkpoint encodes.
    """
    path = Path(path)
    model = tiny_model("gpt_oss", seed, **overrides)
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            experts = layer.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(experts, name)  # transformers keeps [E, in, out]
                packed = quantize(param.transpose(1, 2))  # [E, out, in]
                param.copy_(packed.dequantize(torch.float32).transpose(1, 2))
                prefix = f"model.layers.{index}.mlp.experts.{name}"
                del state[prefix]
                state[f"{prefix}_blocks"] = packed.blocks.contiguous()
                state[f"{prefix}_scales"] = packed.scales.contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
        ],  # fmt: skip
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return model
