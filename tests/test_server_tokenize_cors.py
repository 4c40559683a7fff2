"""POST /tokenize and /detokenize (vLLM's shape) against transformers' tokenizer, and CORS preflight."""

from __future__ import annotations

import httpx
import pytest

from server.app import create_app
from server.settings import ServerSettings
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine

pytestmark = pytest.mark.timeout(120)
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tokenize") / "tiny")


@pytest.fixture(scope="module")
def live(model_dir):
    settings = ServerSettings(api_keys=("sk-test",), allowed_origins=(ORIGIN,))
    server = LiveServer(create_app({"tiny": tiny_engine(model_dir, "tiny")}, settings))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.base_url, headers={"authorization": "Bearer sk-test"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_tokenize_prompt_matches_transformers_and_round_trips(http, hf_tokenizer):
    text = "The quick brown fox, jumps!"
    body = http.post("/tokenize", json={"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    expected = hf_tokenizer(text)["input_ids"]
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(expected)
    assert body["max_model_len"] == 256
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == hf_tokenizer(text, add_special_tokens=False)["input_ids"] and plain["token_strs"] is None
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages_renders_the_chat_template(http, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    body = http.post("/tokenize", json={"messages": messages}).json()
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("path,payload,param", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, "tokens.0"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
])
def test_tokenizer_routes_refuse_bad_input_in_openai_shape(http, path, payload, param):
    response = http.post(path, json=payload)
    assert response.status_code in (400, 404)
    assert response.json()["error"]["param"] == param


def test_tokenizer_routes_need_the_key(live):
    response = httpx.post(live.base_url + "/tokenize", json={"prompt": "a"})
    assert response.status_code == 401


def test_cors_preflight_and_response_headers(live):
    preflight = httpx.options(live.base_url + "/v1/chat/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200  # answered before the key check: a browser sends no key here
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    models = httpx.get(live.base_url + "/v1/models", headers={"origin": ORIGIN, "authorization": "Bearer sk-test"})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(live.base_url + "/v1/models", headers={"origin": "http://evil.example",
                                                                "access-control-request-method": "GET"})
    assert "access-control-allow-origin" not in other.headers
