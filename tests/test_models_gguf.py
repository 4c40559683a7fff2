"""The same tiny model from GGUF and from safetensors gives the same logits (and transformers' logits).

GGUF files are written here with gguf.GGUFWriter the way llama.cpp's converter lays them out:
gguf's own TensorNameMap for names, Q/K rows permuted for the llama arch, Llama 3 rope scaling as
`rope_freqs`, gpt-oss experts split into gate/up and quantized by gguf.quants as MXFP4.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.loader import open_model
from engine.models import build_model
from kernels.cpu.quant import QuantizedWeight
from kernels.mxfp4 import MXFP4Tensor
from model_factories import save_tiny_gpt_oss_mxfp4, save_tiny_model
from test_models import FP32_TOL, PagedBatcher, prompts, reference_logits, rel_err

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "llama3": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "phi3": gguf.MODEL_ARCH.PHI3, "gpt_oss": gguf.MODEL_ARCH.GPT_OSS}  # fmt: skip


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute, as PEERS.md quotes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1 scaling: one divisor per frequency."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_metadata(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    partial = config.rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim * (partial or 1.0)))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_merges(["t 1"])
    if config.model_type == "gpt_oss":
        rope = config.rope_parameters
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_sliding_window(config.sliding_window)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def gguf_tensors(kind: str, hf, quantized: dict[str, Q] | None = None) -> dict[str, tuple[np.ndarray, Q]]:
    """`quantized`: GGUF name suffix (e.g. "attn_q.weight") -> the type gguf.quants stores it as (else F32)."""
    config = hf.config
    names = gguf.get_tensor_name_map(ARCHS[kind], config.num_hidden_layers)
    out: dict[str, tuple[np.ndarray, Q]] = {}
    for hf_name, tensor in hf.state_dict().items():
        tensor = tensor.detach().float()
        if kind in ("llama", "llama3") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            tensor = llama_cpp_permute(tensor, heads)
        if ".mlp.experts." in hf_name:
            out.update(gpt_oss_experts(hf_name, tensor))
            continue
        if kind == "llama" and hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if hf_name.endswith("sinks"):
            name += ".weight"  # llama.cpp's gpt-oss converter does the same
        qtype = next((t for suffix, t in (quantized or {}).items() if name.endswith(suffix)), Q.F32)
        array = tensor.numpy() if qtype == Q.F32 else gguf.quants.quantize(tensor.numpy(), qtype)
        out[name] = (array, qtype)
    if kind == "llama3":
        head_dim = config.hidden_size // config.num_attention_heads
        out["rope_freqs.weight"] = (llama3_rope_factors(config.rope_parameters, head_dim), Q.F32)
    return out


def gpt_oss_experts(hf_name: str, tensor: torch.Tensor) -> dict[str, tuple[np.ndarray, Q]]:
    """HF `[E, in, out]` experts -> llama.cpp's `[E, out, in]` gate/up/down, gate_up de-interleaved, MXFP4."""
    layer = int(hf_name.split(".")[2])
    names = {kind: gguf.TENSOR_NAMES[kind].format(bid=layer) for kind in gguf.MODEL_TENSOR}
    gate, up, down = (names[gguf.MODEL_TENSOR.FFN_GATE_EXP], names[gguf.MODEL_TENSOR.FFN_UP_EXP],
                      names[gguf.MODEL_TENSOR.FFN_DOWN_EXP])  # fmt: skip

    def mxfp4(w: torch.Tensor) -> tuple[np.ndarray, Q]:
        return gguf.quants.quantize(w.contiguous().numpy(), Q.MXFP4), Q.MXFP4

    if hf_name.endswith("gate_up_proj"):
        w = tensor.transpose(1, 2)
        return {f"{gate}.weight": mxfp4(w[:, ::2]), f"{up}.weight": mxfp4(w[:, 1::2])}
    if hf_name.endswith("gate_up_proj_bias"):
        return {f"{gate}.bias": (tensor[:, ::2].numpy(), Q.F32), f"{up}.bias": (tensor[:, 1::2].numpy(), Q.F32)}
    if hf_name.endswith("down_proj"):
        return {f"{down}.weight": mxfp4(tensor.transpose(1, 2))}
    return {f"{down}.bias": (tensor.numpy(), Q.F32)}


def write_gguf(path: Path, kind: str, hf, quantized: dict[str, Q] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCHS[kind]])
    write_metadata(writer, hf.config)
    for name, (array, qtype) in gguf_tensors(kind, hf, quantized).items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "phi3"])
def test_gguf_matches_safetensors_and_transformers(tmp_path, kind):
    hf = save_tiny_model(kind, tmp_path / "hf")
    from_st = build_model(open_model(tmp_path / "hf"))
    from_gguf = build_model(open_model(write_gguf(tmp_path / "m.gguf", kind, hf)))
    batch = prompts((9, 4), seed=7)
    out_st = PagedBatcher(from_st, block_size=4).step(dict(enumerate(batch)))
    out_gguf = PagedBatcher(from_gguf, block_size=4).step(dict(enumerate(batch)))
    for tokens, a, b in zip(batch, out_st, out_gguf):
        assert rel_err(b, a) < FP32_TOL
        assert rel_err(b, reference_logits(hf, tokens)) < FP32_TOL


def test_gguf_gpt_oss_mxfp4_matches_safetensors(tmp_path):
    # llama.cpp always truncates the YaRN correction range, and the loader says so for GGUF.
    rope = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": True, "original_max_position_embeddings": 64}  # fmt: skip
    hf = save_tiny_gpt_oss_mxfp4(tmp_path / "hf", seed=4, rope_parameters=rope)
    from_st = build_model(open_model(tmp_path / "hf"))
    from_gguf = build_model(open_model(write_gguf(tmp_path / "m.gguf", "gpt_oss", hf)))
    assert isinstance(from_gguf.layers[1].mlp.gate_up, (MXFP4Tensor, QuantizedWeight))  # packed, not dense
    batch = prompts((8, 11), seed=8)
    out_st = PagedBatcher(from_st, block_size=3).step(dict(enumerate(batch)))
    out_gguf = PagedBatcher(from_gguf, block_size=3).step(dict(enumerate(batch)))
    for tokens, a, b in zip(batch, out_st, out_gguf):
        assert rel_err(b, a) < FP32_TOL
        assert rel_err(b, reference_logits(hf, tokens)) < FP32_TOL


# Quantized the way llama.cpp's mixed files are: types differ within one fused QKV.
MIXED_TYPES = {"attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q8_0, "attn_output.weight": Q.Q4_1,
               "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.Q4_1, "ffn_down.weight": Q.Q4_0,
               "token_embd.weight": Q.Q8_0}  # fmt: skip


@pytest.mark.parametrize("activations,tolerance", [("fp32", FP32_TOL), ("int16", 1e-3)])
def test_quantized_gguf_stays_quantized_on_the_cpu_backend(tmp_path, monkeypatch, activations, tolerance):
    """The CPU backend keeps every projection and the tied embedding quantized (no fp32 copy) and its logits
    equal the torch reference's, which dequantizes every weight at load: to fp32 rounding with the exact
    kernels; with integer dot products (x rounded to int16 per block of 32) to 1e-3."""
    from kernels import cpu_ops, reference
    from kernels.cpu import extension, select

    if activations == "int16" and not select.int_dot_available():
        pytest.skip("no integer dot-product kernels on this CPU")
    int_rows = select.PROBE_ROWS[-1] if activations == "int16" else 0
    monkeypatch.setattr(select, "_plan", [dataclasses.replace(select.plan(), int_dot_max_rows=int_rows)])

    if extension.load() is None:
        pytest.skip(f"native CPU kernels unavailable: {extension.unavailable_reason()}")
    hf = save_tiny_model("llama", tmp_path / "hf")
    path = write_gguf(tmp_path / "m.gguf", "llama", hf, MIXED_TYPES)
    dense = build_model(open_model(path), ops=reference)
    quantized = build_model(open_model(path), ops=cpu_ops)
    layer = quantized.layers[0]
    weights = (layer.attention.w.qkv, layer.attention.w.o, layer.mlp.gate_up, layer.mlp.down, quantized.embed)
    assert all(isinstance(w, QuantizedWeight) for w in weights) and quantized.lm_head is quantized.embed
    assert layer.attention.w.qkv.layout == "q8"  # Q4_0 + Q4_1 + Q8_0 rows widened to one layout
    for a, b in zip(weights, (dense.layers[0].attention.w.qkv, dense.layers[0].attention.w.o,
                              dense.layers[0].mlp.gate_up, dense.layers[0].mlp.down, dense.embed)):
        assert torch.equal(a.dequantize(), b)
    batch = prompts((9, 4, 1), seed=3)
    out_dense = PagedBatcher(dense, block_size=4).step(dict(enumerate(batch)))
    out_quantized = PagedBatcher(quantized, block_size=4).step(dict(enumerate(batch)))
    for a, b in zip(out_dense, out_quantized):
        assert rel_err(b, a) < tolerance
