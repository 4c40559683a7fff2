"""Ways to stall or break the server (issue 23's audit), each against a live server: the attack gets a
4xx in OpenAI's shape (or is served within its limits), the engine keeps serving others, and no KV
block leaks."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, wait_until_idle

pytestmark = pytest.mark.timeout(300)

GRAMMAR_TIMEOUT_S = 1.0
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("robust") / "tiny")
    return AsyncEngine.from_config(EngineConfig(model=str(model_dir), served_model_name="tiny", device="cpu",
                                                dtype="float32", kernel_backend="torch", kv_cache_gib=0.02,
                                                grammar_compile_timeout_s=GRAMMAR_TIMEOUT_S))


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app({"tiny": engine}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def plain_request(client) -> float:
    started = time.monotonic()
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("length", "stop")
    return time.monotonic() - started


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= set(error)
    return error


def test_slow_grammar_compile_is_a_400_naming_the_limit_and_others_are_served(live, client, engine):
    client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                   response_format={"type": "json_object"})  # the compile worker is up
    big_enum = {"type": "object", "properties": {"x": {"enum": [f"value-{i}-{i * 7919 % 10007}"
                                                                  for i in range(10_000)]}}}
    results: list[httpx.Response] = []

    def attack() -> None:
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": big_enum}}}
        results.append(httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=120))

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    started = time.monotonic()
    for thread in attackers:
        thread.start()
    plain_request(client)
    for thread in attackers:
        thread.join(120)
    assert time.monotonic() - started < 30
    for response in results:
        error = assert_openai_error(response, 400)
        assert "--grammar-compile-timeout-s" in error["message"] and error["param"] == "response_format.json_schema.schema"
    assert wait_until_idle(engine)["kv_blocks_used"] == 0
