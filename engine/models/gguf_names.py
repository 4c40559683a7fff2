"""HF tensor names -> llama.cpp's GGUF names, one table per architecture (see gguf/constants.py)."""

from __future__ import annotations

import re
from collections.abc import Callable

_COMMON = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
}
_LLAMA = {
    **_COMMON,
    "post_attention_layernorm": "ffn_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: llama.cpp keeps gate and up fused in ffn_up
}
_GPT_OSS = {
    **_COMMON,
    "post_attention_layernorm": "post_attention_norm",
    "mlp.router": "ffn_gate_inp",
    "mlp.experts.gate_proj": "ffn_gate_exps",  # llama.cpp splits HF's interleaved gate_up_proj
    "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}
TABLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "phi3": _LLAMA, "gpt_oss": _GPT_OSS}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_SUFFIX = re.compile(r"^(.+?)(?:\.|_)(weight|bias)$")


def gguf_renamer(model_type: str) -> Callable[[str], str]:
    """A function taking an HF name (e.g. `model.layers.3.self_attn.q_proj.weight`) to its GGUF name."""
    table = TABLES[model_type]

    def rename(name: str) -> str:
        layer = _LAYER.match(name)
        body = layer.group(2) if layer else name
        if body == "self_attn.sinks":
            mapped = "attn_sinks.weight"
        else:
            suffix = _SUFFIX.match(body)
            if not suffix or suffix.group(1) not in table:
                return name
            mapped = f"{table[suffix.group(1)]}.{suffix.group(2)}"
        return f"blk.{layer.group(1)}.{mapped}" if layer else mapped

    return rename
