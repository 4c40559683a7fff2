"""Request bodies generated from the openai SDK's own request types: never a 5xx, never a hang, and every
4xx in OpenAI's error shape naming a field the body carries.

hypothesis builds the bodies from the SDK's TypedDicts (`st.from_type`); what it makes that JSON cannot
carry (sets, iterators, Decimals) is turned into the nearest JSON value first. `model` is always the
served one (a random name is just a 404) and token counts are kept small so the property runs quickly.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine

pytestmark = pytest.mark.timeout(600)

MAX_TOKENS = 3
MAX_ITEMS = 8
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")
PROPERTY = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def jsonable(value):
    """The nearest JSON value: mappings keep string keys, other iterables become (short) lists, the rest text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else 0.0
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (bytes, bytearray)):
        return value.decode("latin-1")
    if isinstance(value, Iterable):  # hypothesis may hand an endless iterator for an `Iterable[...]` type
        return [jsonable(item) for item in itertools.islice(value, MAX_ITEMS)]
    return str(value)


def small(body: dict) -> dict:
    body = {**jsonable(body), "model": "tiny"}
    for field in TOKEN_FIELDS:
        if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if not any(isinstance(body.get(field), int) for field in TOKEN_FIELDS):
        body["max_tokens"] = MAX_TOKENS
    return body


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    server = LiveServer(create_app({"tiny": tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("property") / "tiny"))}))
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client
    server.stop()


def check(http: httpx.Client, path: str, body: dict) -> None:
    """Sent as ASCII JSON (lone surrogates stay escaped, as a JSON client may send them)."""
    response = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        assert error["param"] is not None and error["param"].split(".")[0] in body, (body, error)
        assert "[" not in error["param"] and ".str" not in error["param"], (body, error)  # a field, not a type
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", response.text
        for event in events[:-1]:
            assert "error" not in json.loads(event), (body, event)


@PROPERTY
@given(st.from_type(chat_create_params.CompletionCreateParamsNonStreaming))
def test_chat_bodies_from_the_sdk_types(http, body):
    check(http, "/v1/chat/completions", small(body))


@PROPERTY
@given(st.from_type(chat_create_params.CompletionCreateParamsStreaming))
def test_streamed_chat_bodies_from_the_sdk_types(http, body):
    check(http, "/v1/chat/completions", small(body))


@PROPERTY
@given(st.one_of(st.from_type(completion_create_params.CompletionCreateParamsNonStreaming),
                 st.from_type(completion_create_params.CompletionCreateParamsStreaming)))
def test_completion_bodies_from_the_sdk_types(http, body):
    check(http, "/v1/completions", small(body))
