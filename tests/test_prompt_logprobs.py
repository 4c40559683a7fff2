"""Prompt logprobs against transformers' own forward pass over the prompt: whole prefill, chunked prefill,
a prompt whose prefix is cached, and n > 1 (the prompt is scored once)."""

from __future__ import annotations

import pytest
import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from server_fixtures import save_tiny_llama

pytestmark = pytest.mark.timeout(300)
PROMPT = "The quick brown fox jumps over the lazy dog. Paged attention keeps the key value cache"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("prompt_logprobs") / "tiny")


@pytest.fixture(scope="module")
def reference(model_dir):
    """(prompt ids, logprobs of each prompt token given the ones before, full distributions) from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    chosen = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return ids, chosen, logprobs[:-1]


def engine(model_dir, **config) -> LLM:
    return LLM(str(model_dir), device="cpu", dtype="float32", kernel_backend="torch", kv_cache_gib=0.02, **config)


def check(output, reference, top: int) -> None:
    ids, chosen, distributions = reference
    entries = output.prompt_logprobs
    assert output.prompt_token_ids == ids and len(entries) == len(ids) and entries[0] is None
    assert [e.token_id for e in entries[1:]] == ids[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries[1:]]), chosen, atol=1e-4, rtol=0)
    for entry, distribution in zip(entries[1:], distributions):
        assert entry.rank == int((distribution > distribution[entry.token_id]).sum()) + 1
        assert [t for t, _, _ in entry.top] == distribution.topk(top).indices.tolist()


@pytest.mark.parametrize("config", [{}, {"max_num_batched_tokens": 8, "block_size": 4}], ids=["whole", "chunked"])
def test_prompt_logprobs_match_transformers(model_dir, reference, config):
    llm = engine(model_dir, **config)
    params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    first, again = llm.generate([PROMPT, PROMPT], params)  # the second could read the first's cached prefix
    check(first, reference, 3)
    check(again, reference, 3)
    assert llm.generate(PROMPT, SamplingParams(max_tokens=2))[0].prompt_logprobs is None  # only when asked


def test_n_samples_score_the_prompt_once(model_dir, reference):
    out = engine(model_dir).generate(PROMPT, SamplingParams(max_tokens=3, n=3, temperature=1.0, seed=1,
                                                            prompt_logprobs=0))[0]
    check(out, reference, 0)
    assert len(out.outputs) == 3


# --- through the server: completions' echo with logprobs, and vLLM's prompt_logprobs ------------------------


@pytest.fixture(scope="module")
def http(model_dir):
    import httpx

    from server.app import create_app
    from server_fixtures import LiveServer, tiny_engine

    server = LiveServer(create_app({"tiny": tiny_engine(model_dir)}))
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client
    server.stop()


def streamed(http, path: str, body: dict) -> list[dict]:
    import json

    response = http.post(path, json={**body, "stream": True})
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_leads_with_the_prompts_logprobs(http, reference, stream):
    ids, chosen, _ = reference
    body = {"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0}
    if stream:
        chunks = [c["choices"][0] for c in streamed(http, "/v1/completions", body) if c["choices"]]
        text = "".join(c["text"] for c in chunks)
        blocks = [c["logprobs"] for c in chunks if c["logprobs"]]
        logprobs = {key: [v for block in blocks for v in block[key]] for key in blocks[0]}
    else:
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        text, logprobs = choice["text"], choice["logprobs"]
    assert text.startswith(PROMPT)
    prompt_part = len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:prompt_part]), chosen, atol=1e-4, rtol=0)
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"][1:])
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[1] == 0  # <s> is not in the text
    assert offsets[prompt_part] == len(PROMPT) and all(o <= len(text) for o in offsets)
    for token, offset in zip(logprobs["tokens"][1:prompt_part], offsets[1:prompt_part]):
        assert text[offset:offset + len(token)] == token


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_vllm_prompt_logprobs(http, reference, path, body, stream):
    body = {"model": "tiny", "max_tokens": 2, "prompt_logprobs": 1, **body}
    if stream:  # on the stream's first chunk; usage from the last
        chunks = streamed(http, path, {**body, "stream_options": {"include_usage": True}})
        out = {**chunks[0], "usage": chunks[-1]["usage"]}
        assert all("prompt_logprobs" not in c and "prompt_logprobs" not in (c["choices"] or [{}])[0]
                   for c in chunks[1:])
    else:
        out = http.post(path, json=body).json()
    scored = out["prompt_logprobs"] if "messages" in body else out["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == out["usage"]["prompt_tokens"]
    for entry in scored[1:]:
        assert 1 <= len(entry) <= 2 and all({"logprob", "rank", "decoded_token"} == set(v) for v in entry.values())
    if "prompt" in body:
        ids, chosen, _ = reference
        got = [scored[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
        torch.testing.assert_close(torch.tensor(got), chosen, atol=1e-4, rtol=0)
