"""The HTTP server end to end: a real uvicorn on a loopback port, a tiny Llama, the official openai client.

References nobody here wrote: transformers' greedy `generate` for the text, the
tokenizer from transformers for token counts, and the openai client's own parsing
for the wire format (SSE, errors, ids).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
import torch

from engine.async_engine import AsyncEngine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.loader import read_model_info
from server.app import create_app
from server.settings import ServerSettings
from server_fixtures import SPECIAL_TOKENS, LiveServer, save_tiny_llama, tiny_engine, wait_until_idle

pytestmark = pytest.mark.timeout(120)

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("server") / "tiny")


@pytest.fixture(scope="module")
def engines(model_dir):
    return {"tiny": tiny_engine(model_dir, "tiny"), "tiny-copy": tiny_engine(model_dir, "tiny-copy")}


@pytest.fixture(scope="module")
def live(engines):
    server = LiveServer(create_app(engines))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_greedy(hf, prompt_ids: list[int], max_tokens: int) -> list[int]:
    model, tokenizer = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def hf_text(hf, prompt_ids: list[int], max_tokens: int) -> str:
    ids = hf_greedy(hf, prompt_ids, max_tokens)
    eos = hf[1].eos_token_id
    ids = ids[: ids.index(eos)] if eos in ids else ids
    return hf[1].decode(ids, skip_special_tokens=True)


def chat_prompt_ids(hf, messages: list[dict]) -> list[int]:
    text = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return hf[1].encode(text, add_special_tokens=False)


# --- models -----------------------------------------------------------------------------------------------


def test_models_list_and_retrieve_carry_loader_metadata(client, model_dir, engines):
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["tiny", "tiny-copy"]
    card = client.models.retrieve("tiny")
    info = read_model_info(model_dir)
    assert card.object == "model" and card.owned_by == "minerva" and isinstance(card.created, int)
    extra = card.model_extra
    for key in ("format", "quantization", "file_size", "tensor_count", "layers", "vocab_size", "parameters"):
        assert extra[key] == getattr(info, key), key
    assert extra["trained_context_length"] == info.context_length
    assert extra["context_length"] == extra["max_model_len"] == engines["tiny"].max_model_len  # what a client may fill
    assert extra["compact_id"].split("|")[1:] == info.compact_id.split("|")[1:]
    assert "path" not in extra


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# --- completions -------------------------------------------------------------------------------------------


def test_greedy_completion_matches_transformers(client, hf):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    prompt_ids = hf[1].encode(PROMPT)
    assert out.choices[0].text == hf_text(hf, prompt_ids, MAX_TOKENS)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and abs(out.created - time.time()) < 60
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens <= MAX_TOKENS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == MAX_TOKENS


def test_greedy_through_the_api_equals_llm_generate(client, model_dir):
    llm = LLM(str(model_dir), device="cpu", dtype="float32", kernel_backend="torch", kv_cache_gib=0.02)
    prompts = [PROMPT, "Hello world"]
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    online = client.completions.create(model="tiny", prompt=prompts, max_tokens=MAX_TOKENS, temperature=0)
    assert [c.text for c in online.choices] == [o.outputs[0].text for o in offline]
    assert online.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in offline)


def test_token_id_prompts_and_multiple_prompts(client, hf):
    ids = hf[1].encode(PROMPT)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    many = client.completions.create(model="tiny-copy", prompt=[PROMPT, "Hello world"], max_tokens=4, temperature=0,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == hf_text(hf, ids, 4)
    assert many.choices[2].text == hf_text(hf, hf[1].encode("Hello world"), 4)
    assert many.usage.prompt_tokens == len(ids) + len(hf[1].encode("Hello world"))


def test_echo_prefixes_the_prompt(client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.choices[0].text == PROMPT + plain.choices[0].text


def test_seeds_span_64_bits_signed_or_not(client):
    for seed in (-(2**63), 2**64 - 1):  # n=2 uses seed and seed+1, which wraps
        texts = [[c.text for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=2,
                                                             seed=seed).choices] for _ in range(2)]
        assert texts[0] == texts[1]


def test_seeded_sampling_is_reproducible_and_n_gives_n_choices(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, n=3, logprobs=0)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in first.choices)
    other = client.completions.create(**{**kwargs, "seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in first.choices]


def test_stop_string_cuts_the_text(client, hf):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
    assert len(full) >= 4, full
    stop = full[2:4]
    cut = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]


def test_completion_logprobs_agree_with_transformers(client, hf):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    model, tokenizer = hf
    prompt_ids = tokenizer.encode(PROMPT)
    generated = hf_greedy(hf, prompt_ids, 4)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1: -1]
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert lp.token_logprobs == pytest.approx(expected.tolist(), abs=1e-3)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)


# --- chat -------------------------------------------------------------------------------------------------


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]


def test_greedy_chat_matches_transformers_with_template(client, hf):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                         temperature=0)
    prompt_ids = chat_prompt_ids(hf, MESSAGES)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == hf_text(hf, prompt_ids, MAX_TOKENS)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(prompt_ids)


def test_chat_developer_role_and_text_parts(client, hf):
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    out = client.chat.completions.create(model="tiny", messages=parts, max_tokens=5, temperature=0)
    assert out.choices[0].message.content == hf_text(hf, chat_prompt_ids(hf, MESSAGES), 5)


def test_chat_logprobs_and_seeded_n(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0.8, seed=3,
                                         n=2, logprobs=True, top_logprobs=2)
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0.8, seed=3,
                                           n=2, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]
    for choice in out.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content if t.token not in SPECIAL_TOKENS) == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_response_format_text_accepted(client):  # json formats: tests/test_chat_tools.py
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                        response_format={"type": "text"})
    assert ok.choices[0].finish_reason in ("length", "stop")


# --- streaming --------------------------------------------------------------------------------------------


def test_streamed_completion_equals_unstreamed_with_usage(client):
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1


def test_streamed_chat_equals_unstreamed(client):
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage == plain.usage
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)


def test_streamed_n2_stop_and_logprobs_equal_unstreamed(client):
    """Deltas joined per choice give the non-streamed choices: text, stop, finish reasons, logprob tokens."""
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.8, seed=5, n=2, logprobs=2)
    stop = client.completions.create(**kw).choices[0].text[3:5]
    assert stop
    plain = client.completions.create(**kw, stop=[stop])
    chunks = list(client.completions.create(**kw, stop=[stop], stream=True))
    for choice in plain.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        assert [t for c in mine if c.logprobs for t in c.logprobs.tokens] == choice.logprobs.tokens
    assert plain.choices[0].finish_reason == "stop" and stop not in plain.choices[0].text


def test_sse_wire_format_ends_with_done(live):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(line[6:]) for line in events[:-1])


def test_32_concurrent_streaming_clients_finish_with_exact_usage(live, client):
    expected = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    async_client = openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one() -> tuple[str, object, int]:
        stream = await async_client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                                       stream=True, stream_options={"include_usage": True})
        text, usage, pieces = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                pieces += bool(chunk.choices[0].text)
            if chunk.usage:
                usage = chunk.usage
        return text, usage, pieces

    async def health_latencies(http: httpx.AsyncClient) -> list[float]:
        """While the streams run, other connections must still be answered promptly."""
        latencies = []
        for _ in range(5):
            await asyncio.sleep(0.05)
            start = time.monotonic()
            assert (await http.get(live.base_url + "/v1/models")).status_code == 200
            latencies.append(time.monotonic() - start)
        return latencies

    async def all_of_them():
        async with httpx.AsyncClient(timeout=60) as http:
            try:
                return await asyncio.gather(asyncio.gather(*(one() for _ in range(32))), health_latencies(http))
            finally:
                await async_client.close()

    results, latencies = asyncio.run(all_of_them())
    assert len(results) == 32
    assert max(latencies) < 2.0, latencies
    for text, usage, pieces in results:
        assert text == expected.choices[0].text
        assert usage == expected.usage
        assert pieces >= 1


# --- disconnects ------------------------------------------------------------------------------------------


def start_long_request(live, stream: bool) -> socket.socket:
    """Send a long completion over a raw socket, so the test decides exactly when the client goes away."""
    body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                       "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_blocks(live, engines, stream):
    assert wait_until_idle(engines["tiny"]).kv_blocks_used == 0
    sock = start_long_request(live, stream)
    try:
        if stream:
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(65536)
                assert chunk, "server closed the stream early"
                received += chunk
        deadline = time.monotonic() + 20
        while engines["tiny"].stats().kv_blocks_used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engines["tiny"].stats().kv_blocks_used > 0
    finally:
        sock.close()
    stats = wait_until_idle(engines["tiny"])
    assert stats.num_running == 0 and stats.kv_blocks_used == 0, stats


# --- errors -----------------------------------------------------------------------------------------------


def post(live, path: str, **kwargs) -> httpx.Response:
    return httpx.post(live.base_url + path, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "tiny", "prompt": [[1, 2], [999999]]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 1000.0}}, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tiny", "prompt": "x", "seed": 2**70}, "seed"),
])
def test_invalid_completion_fields_are_400_naming_the_field(live, body, param):
    assert_openai_error(post(live, "/v1/completions", json=body), 400, param)


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", rb'{"model": "tiny", "prompt": "a\ud800b"}', "prompt"),
    ("/v1/chat/completions", rb'{"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]}', "messages"),
])
def test_lone_surrogates_are_400_not_500(live, path, raw, param):
    """Valid JSON escapes that no UTF-8 text can hold."""
    response = post(live, path, content=raw, headers={"content-type": "application/json"})
    assert "not valid Unicode" in assert_openai_error(response, 400, param)["message"]


def test_error_messages_quoting_a_lone_surrogate_stay_encodable(live):
    response = post(live, "/v1/completions", content=rb'{"model": "\ud800", "prompt": "x"}',
                    headers={"content-type": "application/json"})
    assert "\\ud800" in assert_openai_error(response, 404, "model")["message"]


def test_max_tokens_past_the_context_is_clamped_and_a_prompt_past_it_is_400(live, client, hf):
    prompt_tokens = len(hf[1].encode(PROMPT))
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.total_tokens == 256
    assert out.usage.prompt_tokens == prompt_tokens
    long_prompt = PROMPT * 100
    error = assert_openai_error(post(live, "/v1/completions", json={"model": "tiny", "prompt": long_prompt}), 400,
                                "prompt")
    assert "256" in error["message"] and error["code"] == "context_length_exceeded"


def test_malformed_requests_never_leak_fastapi_shapes(live):
    bad_json = post(live, "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(bad_json, 400)
    assert_openai_error(post(live, "/v1/chat/completions", json={"model": "tiny", "messages": []}), 400, "messages")
    assert_openai_error(post(live, "/v1/chat/completions",
                             json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_openai_error(httpx.get(live.base_url + "/v1/nowhere"), 404)
    assert_openai_error(httpx.get(live.base_url + "/v1/completions"), 405)


def test_health_and_version(live):
    health = httpx.get(live.base_url + "/health").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "tiny-copy"}
    assert httpx.get(live.base_url + "/version").json()["version"]


def test_request_id_is_echoed(live):
    response = httpx.get(live.base_url + "/v1/models", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert httpx.get(live.base_url + "/v1/models").headers["x-request-id"].startswith("req-")


# --- the app without a network: API keys, 500s, tool endpoints ---------------------------------------------


def asgi_get(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.request(method, path, **kwargs)

    return asyncio.run(call())


def test_api_key_guards_v1_routes_but_not_health(engines):
    app = create_app(engines, ServerSettings(api_keys=("sekret",)), manage_engines=False)
    error = assert_openai_error(asgi_get(app, "GET", "/v1/models"), 401)
    assert error["type"] == "authentication_error"
    assert_openai_error(asgi_get(app, "GET", "/v1/models", headers={"authorization": "Bearer wrong"}), 401)
    assert asgi_get(app, "GET", "/v1/models", headers={"authorization": "Bearer sekret"}).status_code == 200
    assert asgi_get(app, "GET", "/health").status_code == 200


def test_an_engine_that_is_not_running_is_a_503(engines):
    if not isinstance(engines["tiny-copy"], AsyncEngine):
        pytest.skip("MINERVA_TEST_ENGINE_PROCESS=1: no in-process engine to wrap (tests/test_engine_process.py covers it)")
    idle = AsyncEngine(engines["tiny-copy"].engine)  # same model, loop never started
    app = create_app({"tiny": idle}, manage_engines=False)
    error = assert_openai_error(asgi_get(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": "x"}), 503)
    assert error["code"] == "engine_unavailable"


class FailingTokenizer:
    """Fault injection: the tokenizer breaks, as a bug in any layer below the routes would."""

    has_chat_template = True

    def encode(self, text, add_special_tokens=True):
        raise RuntimeError("tokenizer exploded")


class EngineWithFailingTokenizer:
    def __init__(self, engine) -> None:
        self.model_info, self.max_model_len, self.tokenizer = engine.model_info, engine.max_model_len, FailingTokenizer()


def test_unexpected_errors_are_500s_logged_with_the_request_id(engines, caplog):
    app = create_app({"tiny": EngineWithFailingTokenizer(engines["tiny"])}, manage_engines=False)
    with caplog.at_level("ERROR", logger="minerva.server"):
        response = asgi_get(app, "POST", "/v1/completions", json={"model": "tiny", "prompt": "x"})
    error = assert_openai_error(response, 500)
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"] and "exploded" not in error["message"]
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_compact_ids_and_batch_check(live, engines, model_dir, tmp_path):
    compact = httpx.get(live.base_url + "/v1/minerva/compact").json()["models"]
    info = read_model_info(model_dir)
    assert compact == ["tiny|" + info.compact_id.split("|", 1)[1], "tiny-copy|" + info.compact_id.split("|", 1)[1]]
    checked = post(live, "/v1/minerva/models/check", json={"models": ["tiny", str(model_dir)]}).json()["results"]
    assert checked[0]["ok"] and checked[0]["compact_id"] == compact[0]
    assert not checked[1]["ok"] and checked[1]["error"] == "not served by this server"
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    app = create_app(engines, ServerSettings(allow_path_checks=True), manage_engines=False)
    body = {"models": [str(model_dir), str(tmp_path / "broken.gguf")]}
    results = asgi_get(app, "POST", "/v1/minerva/models/check", json=body).json()["results"]
    assert results[0]["ok"] and results[0]["compact_id"] == info.compact_id
    assert not results[1]["ok"] and "broken.gguf" in results[1]["error"]


def test_throughput_estimate_follows_the_documented_formula(live, model_dir):
    from safetensors import safe_open

    from server.throughput import DEVICES

    bytes_per = {"F32": 4, "F16": 2, "BF16": 2}
    stored, params = 0, 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        for name in weights.keys():
            if name.endswith("embed_tokens.weight"):  # one row per token; lm_head is separate
                continue
            tensor = weights.get_slice(name)
            count = 1
            for dim in tensor.get_shape():
                count *= dim
            stored += count * bytes_per[tensor.get_dtype()]
            params += count
    info = read_model_info(model_dir)
    kv_per_token = info.layers * 2 * info.kv_heads * info.head_dim * 2
    got = httpx.get(live.base_url + "/v1/minerva/throughput",
                    params={"model": "tiny", "device": "h100", "batch": 4, "context": 100}).json()
    assert got["bytes_per_step"] == stored + 4 * 100 * kv_per_token
    assert got["flops_per_step"] == 4 * (2 * params + 4 * info.layers * 100 * info.attention_heads * info.head_dim)
    step = max(got["bytes_per_step"] / (DEVICES["h100"].bandwidth_gb_s * 1e9),
               got["flops_per_step"] / (DEVICES["h100"].tflops * 1e12))
    assert got["tokens_per_second"] == pytest.approx(4 / step)
    assert got["bound"] == "memory"
    own = httpx.get(live.base_url + "/v1/minerva/throughput", params={"model": "tiny"}).json()
    assert own["device_key"] == "cpu"
    assert_openai_error(httpx.get(live.base_url + "/v1/minerva/throughput", params={"device": "tpu", "model": "tiny"}),
                        400, "device")
