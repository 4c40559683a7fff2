"""Export the trained default model into engine/assets: gpt-oss MXFP4 safetensors + GGUF.

    .venv/bin/python tools/export_default_model.py --work /tmp/default-model

Layouts follow the real openai/gpt-oss-20b release so Minerva's loader reads the shipped model
exactly as it reads the big one:
- `model.safetensors`: experts as `*_blocks` uint8 [E, out, in/32, 16] + `*_scales` uint8
  [E, out, in/32] (kernels.mxfp4.quantize), every other tensor in bf16, transformers' names;
  `config.json` with `"quantization_config": {"quant_method": "mxfp4", ...}`.
- the GGUF (arch `gpt-oss`) is what llama.cpp's convert_hf_to_gguf.py writes for that checkpoint:
  gate_up split into `ffn_gate_exps`/`ffn_up_exps`, experts as GGML MXFP4 (17-byte blocks:
  scale, then low nibble = element j, high nibble = element j + 16), 1-D tensors and the
  router in F32, other matrices in BF16, a `gpt2` BPE vocabulary with merges.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import GptOssForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from engine.assets import TINY_GPT_OSS_FILES, tiny_gpt_oss_dir, tiny_gpt_oss_gguf  # noqa: E402
from kernels.mxfp4 import quantize  # noqa: E402
from train_default_model import SPECIAL_TOKENS, model_config  # noqa: E402

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|start|>{{ message['role'] }}<|message|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant<|message|>{%- endif -%}"
)
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    "quant_method": "mxfp4",
}
STOP_TOKENS = ("<|return|>", "<|endoftext|>", "<|end|>")
WORDS_FIXTURE = ROOT / "tests" / "data" / "default_model_words.txt"  # the corpus dictionary the tests check against
HELDOUT_FIXTURE = ROOT / "tests" / "data" / "default_model_heldout.txt"  # unseen prose the tests score
HELDOUT_FIXTURE_CHARS = 6000


def load_trained(work: Path) -> GptOssForCausalLM:
    model = GptOssForCausalLM(model_config())
    model.load_state_dict(torch.load(work / "checkpoint.pt", weights_only=True))
    return model.eval()


def checkpoint_tensors(model: GptOssForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict in gpt-oss's release layout: MXFP4 experts, bf16 elsewhere."""
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed = quantize(value.transpose(1, 2))  # transformers [E, in, out] -> release [E, out, in]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = packed.blocks, packed.scales
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
    return tensors


def config_json() -> dict:
    config = model_config().to_dict()
    config.update(architectures=["GptOssForCausalLM"], dtype="bfloat16", output_router_logits=False,
                  quantization_config=QUANTIZATION_CONFIG, use_cache=True)
    for key in ("transformers_version", "_name_or_path", "id2label", "label2id", "output_hidden_states",
                "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "output_attentions"):
        config.pop(key, None)
    return config


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_config().max_position_embeddings,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    return {
        "bos_token_id": None,
        "eos_token_id": [tokenizer.token_to_id(t) for t in STOP_TOKENS],
        "pad_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }


def write_checkpoint(out: Path, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out / "tokenizer.json"))
    files = {"config.json": config_json(), "tokenizer_config.json": tokenizer_config(tokenizer),
             "generation_config.json": generation_config(tokenizer)}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")


def ggml_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Release blocks [..., n, 16] + scales [..., n] -> GGML MXFP4 bytes [..., n * 17]."""
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # element order 0..31
    repacked = codes[..., :16] | (codes[..., 16:] << 4)
    data = torch.cat((scales.unsqueeze(-1), repacked), dim=-1)
    return data.flatten(-2).contiguous().numpy()


def gguf_name(kind: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


def gguf_tensors(tensors: dict[str, torch.Tensor], layers: int) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(name, data, type) as llama.cpp's converter lays out a gpt-oss MXFP4 checkpoint."""
    T, Q = gguf.MODEL_TENSOR, gguf.GGMLQuantizationType

    def f32(t: torch.Tensor) -> tuple[np.ndarray, Q]:
        return t.float().numpy(), Q.F32

    def bf16(t: torch.Tensor) -> tuple[np.ndarray, Q]:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), Q.BF16

    out = [
        (gguf_name(T.TOKEN_EMBD, "weight"), *bf16(tensors["model.embed_tokens.weight"])),
        (gguf_name(T.OUTPUT_NORM, "weight"), *f32(tensors["model.norm.weight"])),
        (gguf_name(T.OUTPUT, "weight"), *bf16(tensors["lm_head.weight"])),
    ]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (gguf_name(T.ATTN_NORM, "weight", i), *f32(tensors[p + "input_layernorm.weight"])),
            (gguf_name(T.ATTN_POST_NORM, "weight", i), *f32(tensors[p + "post_attention_layernorm.weight"])),
            (gguf_name(T.ATTN_SINKS, "weight", i), *f32(tensors[p + "self_attn.sinks"])),
            (gguf_name(T.FFN_GATE_INP, "weight", i), *f32(tensors[p + "mlp.router.weight"])),
            (gguf_name(T.FFN_GATE_INP, "bias", i), *f32(tensors[p + "mlp.router.bias"])),
        ]
        for kind, proj in ((T.ATTN_Q, "q_proj"), (T.ATTN_K, "k_proj"), (T.ATTN_V, "v_proj"), (T.ATTN_OUT, "o_proj")):
            out.append((gguf_name(kind, "weight", i), *bf16(tensors[f"{p}self_attn.{proj}.weight"])))
            out.append((gguf_name(kind, "bias", i), *f32(tensors[f"{p}self_attn.{proj}.bias"])))
        experts = p + "mlp.experts."
        blocks, scales = tensors[experts + "gate_up_proj_blocks"], tensors[experts + "gate_up_proj_scales"]
        bias = tensors[experts + "gate_up_proj_bias"]
        for kind, rows in ((T.FFN_GATE_EXP, slice(0, None, 2)), (T.FFN_UP_EXP, slice(1, None, 2))):
            out.append((gguf_name(kind, "weight", i), ggml_mxfp4(blocks[:, rows], scales[:, rows]), Q.MXFP4))
            out.append((gguf_name(kind, "bias", i), *f32(bias[:, rows])))
        down = ggml_mxfp4(tensors[experts + "down_proj_blocks"], tensors[experts + "down_proj_scales"])
        out.append((gguf_name(T.FFN_DOWN_EXP, "weight", i), down, Q.MXFP4))
        out.append((gguf_name(T.FFN_DOWN_EXP, "bias", i), *f32(tensors[experts + "down_proj_bias"])))
    return out


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    config = model_config()
    rope = config.rope_parameters
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(TINY_GPT_OSS_FILES)
    writer.add_license("apache-2.0")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    add_vocab(writer, tokenizer)
    for name, data, dtype in gguf_tensors(tensors, config.num_hidden_layers):
        writer.add_tensor(name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer) -> None:
    """GPT-2 style BPE vocabulary with merges, specials as CONTROL tokens (llama.cpp's _set_vocab_gpt2)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    model = json.loads(tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp name of the GPT-2 split regex that ByteLevel uses
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    writer.add_add_bos_token(False)
    writer.add_eos_token_id(vocab["<|return|>"])
    writer.add_eot_token_id(vocab["<|end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHAT_TEMPLATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="the training script's --work directory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(args.work / "tokenizer.json"))
    tensors = checkpoint_tensors(load_trained(args.work))
    write_checkpoint(tiny_gpt_oss_dir(), tensors, tokenizer)
    write_gguf(tiny_gpt_oss_gguf(), tensors, tokenizer)
    WORDS_FIXTURE.parent.mkdir(exist_ok=True)
    WORDS_FIXTURE.write_text((args.work / "corpus_words.txt").read_text())
    heldout = (args.work / "heldout.txt").read_text().splitlines()
    totals = itertools.accumulate(len(line) + 1 for line in heldout)
    kept = [line for line, total in zip(heldout, totals) if total <= HELDOUT_FIXTURE_CHARS]
    HELDOUT_FIXTURE.write_text("\n".join(kept) + "\n")
    for path in sorted(tiny_gpt_oss_dir().iterdir()) + [tiny_gpt_oss_gguf()]:
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
