"""GGUF loading checked against the gguf package: files written by gguf.GGUFWriter, read back by
gguf.GGUFReader and dequantized by gguf.quants as the reference for every lazy tensor."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from engine.loader import ModelLoadError, detect_format, open_model, read_model_info
from kernels.mxfp4 import MXFP4Tensor

transformers = pytest.importorskip("transformers")

ARCH_SPECS = {
    "llama": dict(model_type="llama", ctx=256, hidden=64, layers=2, ffn=96, heads=4, kv=2, theta=10000.0),
    "qwen2": dict(model_type="qwen2", ctx=512, hidden=64, layers=3, ffn=128, heads=8, kv=2, theta=1000000.0),
    "phi3": dict(model_type="phi3", ctx=128, hidden=96, layers=2, ffn=64, heads=6, kv=6, theta=10000.0),
    "gpt-oss": dict(
        model_type="gpt_oss", ctx=1024, hidden=64, layers=4, ffn=64, heads=4, kv=2, theta=150000.0,
        head_dim=32, experts=4, active=2, window=16, yarn=(32.0, 32),
    ),
}  # fmt: skip
VOCAB = 40


def _random_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int) -> np.ndarray:
    """Raw Q4_K / Q6_K blocks (gguf can dequantize but not quantize these) with finite f16 scales."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        raw[..., 0:4] = scales.reshape(rows, cols // block, 4)  # d, dmin
    else:
        raw[..., 208:210] = scales[..., 0:2]  # d sits at the end of a Q6_K block
    return raw.reshape(rows, -1)


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]], chat: bool = False) -> dict:
    spec = ARCH_SPECS[arch]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(spec["ctx"])
    writer.add_embedding_length(spec["hidden"])
    writer.add_block_count(spec["layers"])
    writer.add_feed_forward_length(spec["ffn"])
    writer.add_head_count(spec["heads"])
    writer.add_head_count_kv(spec["kv"])
    writer.add_rope_freq_base(spec["theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    if "head_dim" in spec:
        writer.add_key_length(spec["head_dim"])
        writer.add_value_length(spec["head_dim"])
    if "experts" in spec:
        writer.add_expert_count(spec["experts"])
        writer.add_expert_used_count(spec["active"])
        writer.add_expert_feed_forward_length(spec["ffn"])
        writer.add_sliding_window(spec["window"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(spec["yarn"][0])
        writer.add_rope_scaling_orig_ctx_len(spec["yarn"][1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat:
        writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec


@pytest.fixture(scope="module")
def every_type(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """One llama GGUF holding a tensor of every supported type; returns the float originals where they exist."""
    rng = np.random.default_rng(0)
    originals = {name: rng.standard_normal((8, 256)).astype(np.float32) for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "mxfp4")}
    originals["token_embd.weight"] = rng.standard_normal((VOCAB, 64)).astype(np.float32)
    originals["norm"] = rng.standard_normal(64).astype(np.float32)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "token_embd.weight": (originals["token_embd.weight"], None),
        "norm": (originals["norm"], None),
        "f32": (originals["f32"], None),
        "f16": (originals["f16"].astype(np.float16), None),
        "bf16": (gguf.quants.quantize(originals["bf16"], Q.BF16), Q.BF16),
        "q8_0": (gguf.quants.quantize(originals["q8_0"], Q.Q8_0), Q.Q8_0),
        "q4_0": (gguf.quants.quantize(originals["q4_0"], Q.Q4_0), Q.Q4_0),
        "mxfp4": (gguf.quants.quantize(originals["mxfp4"], Q.MXFP4), Q.MXFP4),
        "q4_k": (_random_blocks(rng, Q.Q4_K, 4, 512), Q.Q4_K),
        "q6_k": (_random_blocks(rng, Q.Q6_K, 4, 512), Q.Q6_K),
        "experts": (gguf.quants.quantize(rng.standard_normal((3, 4, 64)).astype(np.float32), Q.MXFP4), Q.MXFP4),
    }
    path = tmp_path_factory.mktemp("gguf") / "every-type.gguf"
    write_gguf(path, "llama", tensors)
    return path, originals


def test_every_tensor_matches_gguf_reader_and_dequantize(every_type):
    path, _ = every_type
    model = open_model(path)
    reference = gguf.GGUFReader(path)
    assert sorted(model.tensors) == sorted(t.name for t in reference.tensors)
    for ref in reference.tensors:
        lazy = model.tensors[ref.name]
        assert lazy.dtype_name == ref.tensor_type.name
        assert lazy.shape == tuple(int(d) for d in reversed(ref.shape))
        raw, kind = lazy.raw()
        assert kind == ref.tensor_type.name and lazy.nbytes == ref.n_bytes
        assert torch.equal(raw, torch.from_numpy(np.array(ref.data).view(np.uint8).reshape(-1)))
        expected = gguf.quants.dequantize(np.asarray(ref.data), ref.tensor_type).astype(np.float32)
        loaded = lazy.load(torch.float32)
        assert loaded.shape == lazy.shape
        assert torch.equal(loaded, torch.from_numpy(expected.reshape(lazy.shape))), ref.name


@pytest.mark.parametrize(
    "name, tolerance",
    [("f32", 0.0), ("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 0.01), ("q4_0", 0.13), ("mxfp4", 0.34)],
)
def test_quantized_round_trip_within_format_tolerance(every_type, name, tolerance):
    path, originals = every_type
    lazy = open_model(path).tensors[name]
    loaded = lazy.load(torch.float32)
    if lazy.is_quantized:
        assert lazy.load().dtype == torch.float32  # quantized types dequantize to float32 by default
    original = torch.from_numpy(originals[name])
    block_max = original.reshape(-1, 32).abs().amax(dim=1, keepdim=True)  # errors scale with each block's range
    assert ((loaded - original).reshape(-1, 32).abs() <= tolerance * block_max).all()


def test_float_tensors_are_zero_copy_views_of_the_file(every_type):
    path, originals = every_type
    tensors = open_model(path).tensors
    first, second = tensors["f32"].load(), tensors["f32"].load()
    assert first.data_ptr() == second.data_ptr()  # both view the same mapped page, nothing copied
    assert tensors["f16"].load().dtype == torch.float16
    assert tensors["bf16"].load().dtype == torch.bfloat16
    assert tensors["f16"].load(torch.float32).dtype == torch.float32


def test_mxfp4_repacks_into_hf_checkpoint_order(every_type):
    path, _ = every_type
    tensors = open_model(path).tensors
    for name in ("mxfp4", "experts"):
        packed = tensors[name].load_mxfp4()
        assert isinstance(packed, MXFP4Tensor) and packed.shape == tensors[name].shape
        assert torch.equal(packed.dequantize(), tensors[name].load())
        assert torch.equal(tensors.mxfp4(name).blocks, packed.blocks)
    with pytest.raises(ModelLoadError, match="not MXFP4"):
        tensors["q8_0"].load_mxfp4()


def test_quantization_summary_for_mixed_file(every_type):
    path, _ = every_type
    info = read_model_info(path)
    assert info.quantization == "mixed"  # Q8_0, Q4_0, Q4_K, Q6_K and MXFP4 matrices side by side
    reader = gguf.GGUFReader(path)
    assert info.parameters == sum(int(t.n_elements) for t in reader.tensors)
    assert info.quantization_breakdown["Q4_K"] == 4 * 512
    assert sum(info.quantization_breakdown.values()) == info.parameters


@pytest.mark.parametrize("arch", sorted(ARCH_SPECS))
def test_model_info_and_config_for_each_architecture(tmp_path, arch):
    spec = ARCH_SPECS[arch]
    rng = np.random.default_rng(1)
    weight = gguf.quants.quantize(rng.standard_normal((spec["hidden"], spec["hidden"])).astype(np.float32), Q.Q8_0)
    tensors = {
        "token_embd.weight": (rng.standard_normal((VOCAB, spec["hidden"])).astype(np.float16), None),
        "output_norm.weight": (np.ones(spec["hidden"], dtype=np.float32), None),
        "blk.0.attn_q.weight": (weight, Q.Q8_0),
    }
    path = tmp_path / f"{arch}-tiny.gguf"
    write_gguf(path, arch, tensors, chat=arch == "gpt-oss")
    assert detect_format(path) == "gguf"
    model = open_model(path)
    info, config = model.info, model.config
    head_dim = spec.get("head_dim", spec["hidden"] // spec["heads"])
    assert (info.id, info.format, info.architecture, info.name) == (f"{arch}-tiny", "gguf", spec["model_type"], f"tiny {arch}")
    assert info.quantization == "Q8_0"
    assert (info.layers, info.hidden_size, info.attention_heads, info.kv_heads) == (
        spec["layers"], spec["hidden"], spec["heads"], spec["kv"]
    )  # fmt: skip
    assert (info.head_dim, info.vocab_size, info.context_length) == (head_dim, VOCAB, spec["ctx"])
    assert (info.experts, info.active_experts) == (spec.get("experts"), spec.get("active"))
    assert info.rope_theta == spec["theta"]
    assert info.chat_template == (arch == "gpt-oss")
    assert info.tensor_count == 3 and info.file_size == path.stat().st_size
    assert info.parameters == VOCAB * spec["hidden"] + spec["hidden"] + spec["hidden"] ** 2
    assert info.compact_id == f"{arch}-tiny|Q8_0|{info.file_size / 1000:.1f}KB|3|{spec['layers']}|{VOCAB}"
    assert config["model_type"] == spec["model_type"] and config["intermediate_size"] == spec["ffn"]
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert model.gguf_fields["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(VOCAB)]
    assert model.tokenizer_files == {}
    hf = transformers.AutoConfig.for_model(**copy.deepcopy(config))  # a dict transformers accepts as is
    assert (hf.num_key_value_heads, hf.head_dim, hf.vocab_size) == (info.kv_heads, info.head_dim, VOCAB)
    assert hf.rope_parameters["rope_theta"] == spec["theta"]
    if arch == "gpt-oss":
        assert (hf.num_local_experts, hf.num_experts_per_tok, hf.sliding_window) == (4, 2, spec["window"])
        assert hf.layer_types == config["layer_types"] and hf.rope_parameters["factor"] == spec["yarn"][0]
        factor, original = spec["yarn"]
        assert info.rope_scaling == {
            "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
        }  # fmt: skip
        assert config["sliding_window"] == spec["window"]
        assert config["layer_types"] == ["sliding_attention", "full_attention"] * (spec["layers"] // 2)
        assert config["rope_parameters"]["rope_type"] == "yarn"
    else:
        assert info.rope_scaling is None and config["sliding_window"] is None


def test_majority_type_names_a_moe_file(tmp_path):
    """Like the official gpt-oss GGUF: Q8_0 attention and embeddings, MXFP4 experts holding most parameters."""
    rng = np.random.default_rng(2)
    experts = gguf.quants.quantize(rng.standard_normal((4, 64, 64)).astype(np.float32), Q.MXFP4)
    attention = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), Q.Q8_0)
    tensors = {
        "token_embd.weight": (gguf.quants.quantize(rng.standard_normal((VOCAB, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0),
        "blk.0.attn_q.weight": (attention, Q.Q8_0),
        "blk.0.ffn_up_exps.weight": (experts, Q.MXFP4),
        "blk.0.attn_norm.weight": (np.ones(64, dtype=np.float32), None),
    }
    path = tmp_path / "moe.gguf"
    write_gguf(path, "gpt-oss", tensors)
    info = read_model_info(path)
    assert info.quantization == "MXFP4"
    assert info.quantization_breakdown == {"MXFP4": 4 * 64 * 64, "Q8_0": VOCAB * 64 + 64 * 64, "F32": 64}
