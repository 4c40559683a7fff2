"""gpt-oss: attention with biases and learned sinks, sliding window on alternate layers, YaRN rope,
and a top-k routed MoE of clamped-SwiGLU experts kept packed in MXFP4.

Expert layouts read here (all become `[E, out, in]`, gate/up rows interleaved):
- official safetensors: `mlp.experts.gate_up_proj_blocks/_scales` (MXFP4, already `[E, 2I, H]`);
- transformers' dense save: `mlp.experts.gate_up_proj` `[E, H, 2I]` (transposed here);
- GGUF: `ffn_gate_exps` and `ffn_up_exps` `[E, I, H]` (re-interleaved here, MXFP4 stays packed).
"""

from __future__ import annotations

from typing import overload

import torch

from engine.layers.attention import AttentionWeights, PagedAttention
from engine.layers.mlp import MoE
from engine.models.decoder import DecoderLayer, DecoderLM, PlaceLayer, keep_layer
from engine.models.spec import ModelSpec
from engine.models.weights import WeightReader
from kernels.mxfp4 import MXFP4Tensor
from kernels.ops import Ops


Expert = torch.Tensor | MXFP4Tensor  # experts as read: dense or packed MXFP4 (`MoE.for_kernels` prepares them)


@overload
def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor: ...
@overload
def interleave_rows(gate: Expert, up: Expert) -> Expert: ...
def interleave_rows(gate: Expert, up: Expert) -> Expert:
    """`[E, I, in]` gate and up -> `[E, 2I, in]` with gate rows at even, up rows at odd indices."""
    if isinstance(gate, MXFP4Tensor) and isinstance(up, MXFP4Tensor):
        return MXFP4Tensor(
            torch.stack((gate.blocks, up.blocks), dim=2).flatten(1, 2),
            torch.stack((gate.scales, up.scales), dim=2).flatten(1, 2),
        )
    if isinstance(gate, MXFP4Tensor) or isinstance(up, MXFP4Tensor):
        raise TypeError("gate and up experts must both be MXFP4 or both dense")
    return torch.stack((gate, up), dim=2).flatten(1, 2)


def _expert(r: WeightReader, name: str, shape: tuple[int, int, int]) -> Expert:
    """An `[E, out, in]` expert weight stored as `name` in [E, out, in] order (MXFP4 or dense)."""
    return r.mxfp4(name, shape) if r.is_mxfp4(name) else r.get(name, shape)


def _experts(spec: ModelSpec, r: WeightReader, p: str, from_gguf: bool) -> tuple[Expert, torch.Tensor, Expert]:
    e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
    if from_gguf:
        gate = _expert(r, f"{p}.gate_proj.weight", (e, i, h))
        up = _expert(r, f"{p}.up_proj.weight", (e, i, h))
        bias = interleave_rows(r.get(f"{p}.gate_proj.bias", (e, i)), r.get(f"{p}.up_proj.bias", (e, i)))
        down = _expert(r, f"{p}.down_proj.weight", (e, h, i))
        return interleave_rows(gate, up), bias, down
    if r.is_mxfp4(f"{p}.gate_up_proj"):
        gate_up: Expert = r.mxfp4(f"{p}.gate_up_proj", (e, 2 * i, h))
        down = r.mxfp4(f"{p}.down_proj", (e, h, i))
    else:
        gate_up = r.get(f"{p}.gate_up_proj", (e, h, 2 * i)).transpose(1, 2).contiguous()
        down = r.get(f"{p}.down_proj", (e, i, h)).transpose(1, 2).contiguous()
    return gate_up, r.get(f"{p}.gate_up_proj_bias", (e, 2 * i)), down


def load_gpt_oss(spec: ModelSpec, r: WeightReader, ops: Ops, from_gguf: bool,
               place_layer: PlaceLayer = keep_layer) -> DecoderLM:
    h, v, q, kv, e = spec.hidden_size, spec.vocab_size, spec.q_size, spec.kv_size, spec.num_experts
    rotary = spec.rotary.to(r.device)
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        sizes = {"q_proj": q, "k_proj": kv, "v_proj": kv}
        weights = AttentionWeights(
            qkv=torch.cat([r.get(f"{a}.{proj}.weight", (rows, h)) for proj, rows in sizes.items()]),
            qkv_bias=torch.cat([r.get(f"{a}.{proj}.bias", (rows,)) for proj, rows in sizes.items()]),
            o=r.get(f"{a}.o_proj.weight", (h, q)),
            o_bias=r.get(f"{a}.o_proj.bias", (h,)),
            sinks=r.get(f"{a}.sinks", (spec.num_heads,), torch.float32),
        )
        attention = PagedAttention(
            weights, spec.num_heads, spec.num_kv_heads, spec.head_dim, rotary, spec.sliding_windows[i], ops
        )
        gate_up, gate_up_bias, down = _experts(spec, r, f"{p}.mlp.experts", from_gguf)
        moe = MoE(
            router=r.get(f"{p}.mlp.router.weight", (e, h)),
            router_bias=r.get(f"{p}.mlp.router.bias", (e,)),
            gate_up=gate_up,
            gate_up_bias=gate_up_bias,
            down=down,
            down_bias=r.get(f"{p}.mlp.experts.down_proj_bias", (e, h)),
            top_k=spec.experts_per_token,
            alpha=spec.swiglu_alpha,
            limit=spec.swiglu_limit,
            ops=ops,
        )
        layer = place_layer(
            DecoderLayer(
                input_norm=r.get(f"{p}.input_layernorm.weight", (h,)),
                attention=attention,
                post_attention_norm=r.get(f"{p}.post_attention_layernorm.weight", (h,)),
                mlp=moe,
            )
        )
        if isinstance(layer.mlp, MoE):  # placed (maybe sliced) in the checkpoint's layout, then swizzled once
            layer.mlp = layer.mlp.for_kernels()
        layers.append(layer)
    embed = r.get("model.embed_tokens.weight", (v, h))
    lm_head = embed if spec.tie_word_embeddings else r.get("lm_head.weight", (v, h))
    return DecoderLM(spec, embed, layers, r.get("model.norm.weight", (h,)), lm_head, ops)
