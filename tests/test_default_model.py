"""The shipped default model (engine/assets) against references nobody here wrote.

transformers' own MXFP4 reader and GptOssForCausalLM, the gguf package's reader and
dequantizer, and transformers' chat-template renderer check the files; generations are
checked for English: most words must be words of the training corpus.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.assets import tiny_gpt_oss_dir, tiny_gpt_oss_gguf
from kernels.mxfp4 import dequantize

MODEL_DIR = tiny_gpt_oss_dir()
WORDS = Path(__file__).parent / "data" / "default_model_words.txt"
HELDOUT = Path(__file__).parent / "data" / "default_model_heldout.txt"
MAX_HELDOUT_LOSS = 4.1  # nats/token on held-out prose; the shipped model scores 3.82, an untrained one ln(4096) = 8.3
PROMPTS = ["Return the number of", "The default value is", "This function is used to", "If the file does not exist,"]
QUESTIONS = ["What does the function sorted do?", "Explain the class Counter."]
WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=1)
def config() -> dict:
    return json.loads((MODEL_DIR / "config.json").read_text())


@lru_cache(maxsize=1)
def checkpoint() -> dict[str, torch.Tensor]:
    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@lru_cache(maxsize=1)
def reference_model():
    """transformers' GptOssForCausalLM reading the shipped MXFP4 checkpoint (dequantized on CPU)."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(
        MODEL_DIR, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    )
    return model.eval()


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)


def chat_prompt(question: str) -> str:
    return tokenizer().apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)


def corpus_word_fraction(texts: list[str]) -> float:
    dictionary = set(WORDS.read_text().split())
    words = [w.lower() for text in texts for w in WORD.findall(text)]
    assert len(words) >= 20, f"too few words generated to judge: {texts}"
    return sum(w in dictionary for w in words) / len(words)


def test_package_ships_a_few_megabytes_of_model_files():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    sizes = [p.stat().st_size for p in MODEL_DIR.iterdir()] + [tiny_gpt_oss_gguf().stat().st_size]
    assert sum(sizes) < 12e6


def test_architecture_is_gpt_oss_scaled_down():
    c = config()
    assert c["model_type"] == "gpt_oss" and c["architectures"] == ["GptOssForCausalLM"]
    assert c["num_local_experts"] > c["num_experts_per_tok"] >= 2
    assert c["layer_types"] == ["sliding_attention", "full_attention"] * (c["num_hidden_layers"] // 2)
    assert c["rope_parameters"]["rope_type"] == "yarn" and c["rope_parameters"]["factor"] > 1
    assert c["hidden_size"] % 32 == 0 and c["intermediate_size"] % 32 == 0
    assert c["quantization_config"]["quant_method"] == "mxfp4"
    assert 2e6 < reference_model().num_parameters() < 10e6


def test_experts_are_stored_in_the_gpt_oss_release_layout():
    c, tensors = config(), checkpoint()
    experts, hidden, inter = c["num_local_experts"], c["hidden_size"], c["intermediate_size"]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        assert tensors[p + "gate_up_proj_blocks"].shape == (experts, 2 * inter, hidden // 32, 16)
        assert tensors[p + "gate_up_proj_scales"].shape == (experts, 2 * inter, hidden // 32)
        assert tensors[p + "down_proj_blocks"].shape == (experts, hidden, inter // 32, 16)
        assert tensors[p + "down_proj_scales"].shape == (experts, hidden, inter // 32)
        assert {tensors[p + s].dtype for s in ("gate_up_proj_blocks", "down_proj_scales")} == {torch.uint8}
        assert p + "gate_up_proj" not in tensors
        assert tensors[f"model.layers.{i}.self_attn.sinks"].shape == (c["num_attention_heads"],)


def test_transformers_dequantizes_the_experts_as_kernels_mxfp4_does():
    model, tensors = reference_model(), checkpoint()
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.mlp.experts."
        for name in ("gate_up_proj", "down_proj"):
            ours = dequantize(tensors[p + name + "_blocks"], tensors[p + name + "_scales"]).transpose(1, 2)
            torch.testing.assert_close(getattr(layer.mlp.experts, name).data, ours, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight.data, tensors["lm_head.weight"].float(), rtol=0, atol=0)


def test_gguf_holds_the_same_tensors():
    reader = gguf.GGUFReader(tiny_gpt_oss_gguf())
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "gpt-oss"
    got = {t.name: t for t in reader.tensors}
    tensors = checkpoint()
    for i in range(config()["num_hidden_layers"]):
        p = f"model.layers.{i}."
        gate_up = dequantize(tensors[p + "mlp.experts.gate_up_proj_blocks"], tensors[p + "mlp.experts.gate_up_proj_scales"])
        down = dequantize(tensors[p + "mlp.experts.down_proj_blocks"], tensors[p + "mlp.experts.down_proj_scales"])
        expected = {
            f"blk.{i}.ffn_gate_exps.weight": gate_up[:, 0::2],
            f"blk.{i}.ffn_up_exps.weight": gate_up[:, 1::2],
            f"blk.{i}.ffn_down_exps.weight": down,
            f"blk.{i}.ffn_gate_exps.bias": tensors[p + "mlp.experts.gate_up_proj_bias"][:, 0::2],
            f"blk.{i}.attn_q.weight": tensors[p + "self_attn.q_proj.weight"],
            f"blk.{i}.attn_sinks.weight": tensors[p + "self_attn.sinks"],
            f"blk.{i}.post_attention_norm.weight": tensors[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate_inp.weight": tensors[p + "mlp.router.weight"],
        }
        for name, want in expected.items():
            tensor = got[name]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            torch.testing.assert_close(torch.from_numpy(values.copy()).float(), want.float(), rtol=0, atol=0)
        assert got[f"blk.{i}.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.MXFP4
    assert len(reader.tensors) == 3 + 19 * config()["num_hidden_layers"]


def test_chat_template_renders_the_trained_format():
    rendered = tokenizer().apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert rendered == ("<|start|>system<|message|>Be brief.<|end|>"
                        "<|start|>user<|message|>Hi<|end|><|start|>assistant<|message|>")
    stops = json.loads((MODEL_DIR / "generation_config.json").read_text())["eos_token_id"]
    assert tokenizer().convert_ids_to_tokens(stops) == ["<|return|>", "<|endoftext|>", "<|end|>"]


def test_transformers_generations_are_corpus_english():
    model, tok = reference_model(), tokenizer()
    chats = [chat_prompt(q) for q in QUESTIONS]
    texts = []
    torch.manual_seed(0)
    for prompt in PROMPTS + chats:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=0.7, top_p=0.9,
                             pad_token_id=tok.pad_token_id)
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert corpus_word_fraction(texts) >= 0.9, texts


def test_heldout_prose_loss_shows_a_trained_model():
    model, tok = reference_model(), tokenizer()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    stream = [i for line in HELDOUT.read_text().splitlines() for i in tok(line).input_ids + [eot]]  # as trained
    ids = torch.tensor(stream[:1024]).view(2, 512)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < MAX_HELDOUT_LOSS


def test_llama_cpp_runs_the_gguf_like_transformers():
    """llama.cpp's own gpt-oss graph on the GGUF agrees with transformers on the safetensors."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model, tok = reference_model(), tokenizer()
    llm = llama_cpp.Llama(model_path=str(tiny_gpt_oss_gguf()), n_ctx=512, logits_all=True, verbose=False,
                          n_threads=1, type_k=0, type_v=0)
    worst, agree = [], []
    try:
        for prompt in [p + " the" for p in PROMPTS[:3]] + [chat_prompt(QUESTIONS[0])]:
            ids = tok(prompt).input_ids
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[: len(ids)])
            with torch.no_grad():
                ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            worst.extend(np.abs(theirs - ours).max(-1))
            agree.extend(theirs.argmax(-1) == ours.argmax(-1))
    finally:
        llm.close()
    # llama.cpp rounds activations (Q8 for MXFP4 matmuls, bf16 for bf16 ones) and always truncates
    # YaRN's correction range (the config says truncate: false); where two experts' router logits
    # nearly tie, that can flip an expert choice and move that position's logits further. A layout
    # error (swapped gate/up, wrong nibble order, wrong names) moves every position.
    assert np.median(worst) < 0.5, worst
    assert np.mean(agree) >= 0.85


class MinervaRunner:
    """Minerva's own model (engine.models over engine.loader) driven like the engine: one sequence, paged KV."""

    def __init__(self, path: Path, block_size: int = 16, num_blocks: int = 32) -> None:
        from engine.loader import open_model
        from engine.models import build_model

        self.model = build_model(open_model(path), dtype=torch.float32)
        self.block_size, self.num_blocks, self.length = block_size, num_blocks, 0
        shape = (num_blocks, block_size, self.model.num_kv_heads, self.model.head_dim)
        dtype = self.model.kv_cache_dtype
        self.model.bind_kv_caches([(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                                   for _ in range(self.model.num_layers)])

    def step(self, ids: list[int]) -> torch.Tensor:
        """Logits `[len(ids), vocab]` for new tokens appended to the sequence."""
        from engine.attention_metadata import AttentionMetadata

        positions = torch.arange(self.length, self.length + len(ids))
        self.length += len(ids)
        meta = AttentionMetadata(
            slot_mapping=positions.clone(),
            block_tables=torch.arange(self.num_blocks, dtype=torch.int32)[None],
            seq_lens=torch.tensor([self.length], dtype=torch.int32),
            query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32),
            num_prefill_tokens=len(ids) if len(ids) > 1 else 0,
            num_decode_tokens=1 if len(ids) == 1 else 0,
        )
        with torch.no_grad():
            return self.model.forward(torch.tensor(ids), positions, meta)


def minerva_prefill_logits(path: Path, ids: list[int]) -> torch.Tensor:
    return MinervaRunner(path).step(ids)


def test_minerva_logits_match_transformers():
    """A 150-token prefill (past the 64-token sliding window) through both the safetensors and the GGUF."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    ids = tokenizer()(HELDOUT.read_text()).input_ids[:150]
    with torch.no_grad():
        expected = reference_model()(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(minerva_prefill_logits(MODEL_DIR, ids), expected, rtol=1e-4, atol=1e-3)
    # GGUF readers (llama.cpp, engine.loader) always truncate YaRN's correction range.
    truncated = GptOssForCausalLM.from_pretrained(
        MODEL_DIR, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32,
        rope_parameters={**config()["rope_parameters"], "truncate": True},
    ).eval()
    with torch.no_grad():
        expected = truncated(input_ids=torch.tensor([ids])).logits[0]
    torch.testing.assert_close(minerva_prefill_logits(tiny_gpt_oss_gguf(), ids), expected, rtol=1e-4, atol=1e-3)


def test_minerva_greedy_decode_matches_transformers():
    """Prefill then token-by-token decode through the paged cache, past the 64-token window."""
    ids = tokenizer()(HELDOUT.read_text()).input_ids[:56]
    expected = list(ids)
    with torch.no_grad():  # transformers' full forward each step: no cache, no stop-token handling
        for _ in range(24):
            expected.append(int(reference_model()(input_ids=torch.tensor([expected])).logits[0, -1].argmax()))
    runner, generated = MinervaRunner(MODEL_DIR), []
    logits = runner.step(ids)
    for _ in range(24):
        generated.append(int(logits[-1].argmax()))
        logits = runner.step(generated[-1:])
    assert generated == expected[len(ids):]


def test_minerva_generations_are_corpus_english():
    """Minerva's offline engine serving the built-in tiny-gpt-oss by name; completions and chats read as English."""
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    prompts = PROMPTS + [chat_prompt(q) for q in QUESTIONS]
    outputs = LLM("tiny-gpt-oss").generate(prompts, SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, seed=0))
    assert corpus_word_fraction([o.outputs[0].text for o in outputs]) >= 0.9
    chat_answers = outputs[len(PROMPTS):]
    assert all(o.outputs[0].finish_reason == "stop" for o in chat_answers)  # ended by <|return|>
