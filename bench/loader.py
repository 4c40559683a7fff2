"""Loader benchmark: metadata reads of gpt-oss-20b-shaped models, cold and warm page cache.

Builds (once, as sparse files: no disk space used) a GGUF declaring gpt-oss-20b's 459
tensors (12.1 GB), the same GGUF with the real 201,088-token vocabulary and 446k merges in
its header, and a 3-shard safetensors checkpoint of the official layout. Each is read with
`read_model_info` N times after evicting its files from the page cache (cold, via
posix_fadvise DONTNEED) and N times hot (warm). Prints a table of medians and writes JSON
with device, commit and settings to bench/results/loader-<device>.json.

    .venv/bin/python -m bench.loader [--repeats 21] [--workdir /tmp/minerva-bench-loader]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from bench.result_files import write_result
from engine.loader import read_model_info

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, VOCAB = 24, 2880, 64, 8, 64, 32, 201088
GGUF_MXFP4_BLOCK_BYTES = 17


def gpt_oss_gguf_tensors() -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, torch-order shape, type) for gpt-oss-20b's 459 tensors: MXFP4 experts, Q8_0 matrices
    elsewhere, F32 vectors; that adds up to the 12.1 GB of the published GGUF."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    tensors = [("token_embd.weight", (VOCAB, HIDDEN), "Q8_0"), ("output_norm.weight", (HIDDEN,), "F32"),
               ("output.weight", (VOCAB, HIDDEN), "Q8_0")]  # fmt: skip
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", (HIDDEN,), "F32"), (b + "post_attention_norm.weight", (HIDDEN,), "F32"),
            (b + "attn_q.weight", (q, HIDDEN), "Q8_0"), (b + "attn_q.bias", (q,), "F32"),
            (b + "attn_k.weight", (kv, HIDDEN), "Q8_0"), (b + "attn_k.bias", (kv,), "F32"),
            (b + "attn_v.weight", (kv, HIDDEN), "Q8_0"), (b + "attn_v.bias", (kv,), "F32"),
            (b + "attn_output.weight", (HIDDEN, q), "Q8_0"), (b + "attn_output.bias", (HIDDEN,), "F32"),
            (b + "attn_sinks.weight", (HEADS,), "F32"),
            (b + "ffn_gate_inp.weight", (EXPERTS, HIDDEN), "F32"), (b + "ffn_gate_inp.bias", (EXPERTS,), "F32"),
            (b + "ffn_gate_exps.weight", (EXPERTS, HIDDEN, HIDDEN), "MXFP4"),
            (b + "ffn_gate_exps.bias", (EXPERTS, HIDDEN), "F32"),
            (b + "ffn_up_exps.weight", (EXPERTS, HIDDEN, HIDDEN), "MXFP4"),
            (b + "ffn_up_exps.bias", (EXPERTS, HIDDEN), "F32"),
            (b + "ffn_down_exps.weight", (EXPERTS, HIDDEN, HIDDEN), "MXFP4"),
            (b + "ffn_down_exps.bias", (EXPERTS, HIDDEN), "F32"),
        ]  # fmt: skip
    return tensors


def write_sparse_gguf(path: Path, with_vocab: bool) -> None:
    writer = gguf.GGUFWriter(path, "gpt-oss")
    writer.add_name("gpt-oss-20b")
    writer.add_context_length(131072)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(HIDDEN)
    writer.add_expert_feed_forward_length(HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_rope_freq_base(150000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(4)
    writer.add_sliding_window(128)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(32.0)
    writer.add_rope_scaling_orig_ctx_len(4096)
    writer.add_tokenizer_model("gpt2")
    if with_vocab:
        writer.add_token_list([f"tok{i:06d}" for i in range(VOCAB)])
        writer.add_token_merges([f"m{i} n{i}" for i in range(446189)])
    writer.add_vocab_size(VOCAB)
    total = 0
    for name, shape, kind in gpt_oss_gguf_tensors():
        qtype = gguf.GGMLQuantizationType[kind]
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel // block * block_bytes
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)  # element shape, not bytes
        total += writer.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_end = path.stat().st_size
    os.truncate(path, writer.ggml_pad(header_end, writer.data_alignment) + total)


def gpt_oss_hf_tensors() -> list[tuple[str, str, list[int]]]:
    """(HF name, dtype, shape) for the official gpt-oss-20b safetensors checkpoint."""
    q, kv, blocks = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HIDDEN // 32
    tensors = [("model.embed_tokens.weight", "BF16", [VOCAB, HIDDEN]), ("model.norm.weight", "BF16", [HIDDEN]),
               ("lm_head.weight", "BF16", [VOCAB, HIDDEN])]  # fmt: skip
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", "BF16", [HIDDEN]), (p + "post_attention_layernorm.weight", "BF16", [HIDDEN]),
            (p + "self_attn.q_proj.weight", "BF16", [q, HIDDEN]), (p + "self_attn.q_proj.bias", "BF16", [q]),
            (p + "self_attn.k_proj.weight", "BF16", [kv, HIDDEN]), (p + "self_attn.k_proj.bias", "BF16", [kv]),
            (p + "self_attn.v_proj.weight", "BF16", [kv, HIDDEN]), (p + "self_attn.v_proj.bias", "BF16", [kv]),
            (p + "self_attn.o_proj.weight", "BF16", [HIDDEN, q]), (p + "self_attn.o_proj.bias", "BF16", [HIDDEN]),
            (p + "self_attn.sinks", "BF16", [HEADS]),
            (p + "mlp.router.weight", "BF16", [EXPERTS, HIDDEN]), (p + "mlp.router.bias", "BF16", [EXPERTS]),
            (p + "mlp.experts.gate_up_proj_blocks", "U8", [EXPERTS, 2 * HIDDEN, blocks, 16]),
            (p + "mlp.experts.gate_up_proj_scales", "U8", [EXPERTS, 2 * HIDDEN, blocks]),
            (p + "mlp.experts.gate_up_proj_bias", "BF16", [EXPERTS, 2 * HIDDEN]),
            (p + "mlp.experts.down_proj_blocks", "U8", [EXPERTS, HIDDEN, blocks, 16]),
            (p + "mlp.experts.down_proj_scales", "U8", [EXPERTS, HIDDEN, blocks]),
            (p + "mlp.experts.down_proj_bias", "BF16", [EXPERTS, HIDDEN]),
        ]  # fmt: skip
    return tensors


def write_sparse_hf_dir(folder: Path, shards: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = gpt_oss_hf_tensors()
    per_shard = -(-len(tensors) // shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s:05d}-of-{shards - 1:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor, dtype, shape in tensors[s * per_shard : (s + 1) * per_shard]:
            numel = 1
            for dim in shape:
                numel *= dim
            nbytes = numel * (1 if dtype == "U8" else 2)
            header[tensor] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = folder / name
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": HIDDEN,
        "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB, "num_local_experts": EXPERTS,
        "experts_per_token": 4, "num_experts_per_tok": 4, "max_position_embeddings": 131072, "sliding_window": 128,
        "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        "quantization_config": {"quant_method": "mxfp4"},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def evict(path: Path) -> None:
    """Drop a model's files from the page cache so the next read is cold."""
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_ms(path: Path) -> float:
    start = time.perf_counter()
    read_model_info(path)
    return (time.perf_counter() - start) * 1e3


def measure(path: Path, repeats: int) -> dict[str, Any]:
    read_model_info(path)  # import and first-touch costs are not the loader's
    cold, warm = [], []
    for _ in range(repeats):
        evict(path)
        cold.append(time_ms(path))
        warm.append(time_ms(path))
    info = read_model_info(path)
    return {
        "path": str(path), "compact_id": info.compact_id, "cold_ms_median": statistics.median(cold),
        "warm_ms_median": statistics.median(warm), "cold_ms": cold, "warm_ms": warm,
    }  # fmt: skip


def save_result(name: str, device: str, record: dict[str, Any]) -> Path:
    """Write `record` to bench/results/{name}-{cuda|cpu}.json (one file per benchmark and device kind)."""
    out = write_result(f"{name}-{'cuda' if 'NVIDIA' in device else 'cpu'}.json", record)
    print(f"saved {out}")
    return out


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minerva-bench-loader"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = {
        "gguf, 459 tensors": args.workdir / "gpt-oss-20b.gguf",
        "gguf, 459 tensors + 201k vocab/446k merges": args.workdir / "gpt-oss-20b-vocab.gguf",
        "safetensors, 3 shards": args.workdir / "gpt-oss-20b",
    }
    builders = {
        "gguf, 459 tensors": lambda p: write_sparse_gguf(p, with_vocab=False),
        "gguf, 459 tensors + 201k vocab/446k merges": lambda p: write_sparse_gguf(p, with_vocab=True),
        "safetensors, 3 shards": write_sparse_hf_dir,
    }
    for label, path in models.items():
        if not path.exists():
            builders[label](path)
    results = {label: measure(path, args.repeats) for label, path in models.items()}
    width = max(map(len, results))
    print(f"{'model':<{width}}  {'cold ms':>8}  {'warm ms':>8}  compact id")
    for label, row in results.items():
        print(f"{label:<{width}}  {row['cold_ms_median']:8.2f}  {row['warm_ms_median']:8.2f}  {row['compact_id']}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = device_name()
    record = {
        "benchmark": "loader.read_model_info", "device": device, "commit": commit,
        "settings": {"repeats": args.repeats, "cold": "posix_fadvise DONTNEED before each read", "python": platform.python_version()},
        "results": results,
    }  # fmt: skip
    save_result("loader", device, record)


if __name__ == "__main__":
    main()
