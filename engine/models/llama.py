"""The Llama family (Llama 2/3, Mistral, Qwen2, Phi-3): GQA attention and a gated SiLU MLP.

They differ only in weight layout: Qwen2 has q/k/v biases, Phi-3 stores qkv and gate_up
fused, and llama-arch GGUF files carry llama.cpp's Q/K row permutation, undone here.
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionWeights, PagedAttention
from engine.layers.mlp import GatedMLP
from engine.layers.rotary import Rotary
from engine.models.decoder import DecoderLayer, DecoderLM, PlaceLayer, keep_layer
from engine.models.spec import ModelSpec
from engine.models.weights import LoadedWeight, WeightReader
from kernels.cpu.quant import QuantizedWeight, cat_rows
from kernels.ops import Ops

# GGUF architectures whose llama.cpp converter permutes Q/K rows for its interleaved (non-NeoX) rope.
PERMUTED_QK = ("llama", "mistral")


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute`: per head, rows (i, half) back to (half, i)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_weight(w: LoadedWeight, num_heads: int) -> LoadedWeight:
    """`unpermute_rows` for a dense or a quantized weight (whose rows move packed)."""
    if isinstance(w, QuantizedWeight):
        return w.select_rows(unpermute_rows(torch.arange(w.shape[0]), num_heads))
    return unpermute_rows(w, num_heads)


def stack_rows(weights: list[LoadedWeight]) -> LoadedWeight:
    """One weight of all rows (fused QKV, gate/up): dense stays dense; quantized ones stay quantized only if
    all are (a dense part, e.g. an F16 tensor beside quantized ones, makes the whole dense)."""
    quantized = [w for w in weights if isinstance(w, QuantizedWeight)]
    if len(quantized) == len(weights):
        return cat_rows(quantized)
    dtype = next(w.dtype for w in weights if isinstance(w, torch.Tensor))
    return torch.cat([w.dequantize().to(dtype) if isinstance(w, QuantizedWeight) else w for w in weights])


def rotary_for(spec: ModelSpec, r: WeightReader) -> Rotary:
    """GGUF llama 3 files keep their rope scaling as per-frequency divisors in `rope_freqs.weight`."""
    if not r.has("rope_freqs.weight"):
        return spec.rotary
    factors = r.get("rope_freqs.weight", (spec.rotary.inv_freq.numel(),), torch.float32).cpu()
    return Rotary(spec.rotary.inv_freq / factors, spec.rotary.mscale)


def _attention_weights(spec: ModelSpec, r: WeightReader, prefix: str, from_gguf: bool) -> AttentionWeights:
    h, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    if spec.model_type == "phi3":
        qkv = r.weight(f"{prefix}.qkv_proj.weight", (q + 2 * kv, h))
        qkv_bias = None
    else:
        wq, wk = r.weight(f"{prefix}.q_proj.weight", (q, h)), r.weight(f"{prefix}.k_proj.weight", (kv, h))
        wv = r.weight(f"{prefix}.v_proj.weight", (kv, h))
        permuted = from_gguf and spec.model_type in PERMUTED_QK
        if permuted:
            wq, wk = unpermute_weight(wq, spec.num_heads), unpermute_weight(wk, spec.num_kv_heads)
        qkv = stack_rows([wq, wk, wv])
        qkv_bias = None
        if spec.qkv_bias:
            bq, bk = r.get(f"{prefix}.q_proj.bias", (q,)), r.get(f"{prefix}.k_proj.bias", (kv,))
            bv = r.get(f"{prefix}.v_proj.bias", (kv,))
            if permuted:
                bq, bk = unpermute_rows(bq, spec.num_heads), unpermute_rows(bk, spec.num_kv_heads)
            qkv_bias = torch.cat((bq, bk, bv))
    o = r.weight(f"{prefix}.o_proj.weight", (h, q))
    o_bias = r.get(f"{prefix}.o_proj.bias", (h,)) if spec.o_bias else None
    return AttentionWeights(qkv=qkv, o=o, qkv_bias=qkv_bias, o_bias=o_bias)


def _mlp(spec: ModelSpec, r: WeightReader, prefix: str, ops: Ops) -> GatedMLP:
    h, i = spec.hidden_size, spec.intermediate_size
    if spec.model_type == "phi3":
        gate_up = r.weight(f"{prefix}.gate_up_proj.weight", (2 * i, h))
    else:
        gate_up = stack_rows([r.weight(f"{prefix}.gate_proj.weight", (i, h)), r.weight(f"{prefix}.up_proj.weight", (i, h))])
    return GatedMLP(gate_up=gate_up, down=r.weight(f"{prefix}.down_proj.weight", (h, i)), ops=ops)


def load_llama(spec: ModelSpec, r: WeightReader, ops: Ops, from_gguf: bool,
               place_layer: PlaceLayer = keep_layer) -> DecoderLM:
    h, v = spec.hidden_size, spec.vocab_size
    rotary = rotary_for(spec, r).to(r.device)
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        attention = PagedAttention(
            _attention_weights(spec, r, f"{p}.self_attn", from_gguf),
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            rotary,
            spec.sliding_windows[i],
            ops,
        )
        layers.append(place_layer(
            DecoderLayer(
                input_norm=r.get(f"{p}.input_layernorm.weight", (h,)),
                attention=attention,
                post_attention_norm=r.get(f"{p}.post_attention_layernorm.weight", (h,)),
                mlp=_mlp(spec, r, f"{p}.mlp", ops),
            )
        ))
    # A quantized embedding is looked up row by row (only the ids' rows are dequantized), so a tied
    # LM head reads the same quantized bytes.
    embed = r.weight("model.embed_tokens.weight", (v, h))
    lm_head = embed if spec.tie_word_embeddings else r.weight("lm_head.weight", (v, h))
    return DecoderLM(spec, embed, layers, r.get("model.norm.weight", (h,)), lm_head, ops)
