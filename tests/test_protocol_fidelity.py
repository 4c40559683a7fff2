"""Every field the official openai SDK can send, sent as null and with a value: accepted, or refused naming it.

The field lists come from the SDK's own request types (`openai.types.chat.completion_create_params`,
`openai.types.completion_create_params`), so a field a newer SDK adds fails `test_every_sdk_field_is_decided`
until this table says what Minerva does with it.
"""

from __future__ import annotations

import typing

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine

pytestmark = pytest.mark.timeout(300)

OK, REFUSED = "ok", "refused"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}

# field -> (a value the SDK can send, what Minerva does with it)
CHAT_FIELDS: dict[str, tuple[object, str]] = {
    "messages": ([{"role": "user", "content": "Hello"}], OK),
    "model": ("tiny", OK),
    "audio": ({"voice": "alloy", "format": "wav"}, REFUSED),
    "frequency_penalty": (0.5, OK),
    "function_call": ("auto", REFUSED),
    "functions": ([TOOL["function"]], REFUSED),
    "logit_bias": ({"5": 10}, OK),
    "logprobs": (True, OK),
    "max_completion_tokens": (2, OK),
    "max_tokens": (2, OK),
    "metadata": ({"team": "a"}, OK),
    "modalities": (["text"], OK),
    "moderation": ({"policy": {"input": {"mode": "score"}}}, REFUSED),
    "n": (2, OK),
    "parallel_tool_calls": (False, OK),
    "prediction": ({"type": "content", "content": "Hello there"}, OK),
    "presence_penalty": (0.5, OK),
    "prompt_cache_key": ("key", OK),
    "prompt_cache_options": ({"mode": "implicit", "ttl": "30m"}, OK),
    "prompt_cache_retention": ("24h", OK),
    "reasoning_effort": ("minimal", OK),
    "response_format": ({"type": "json_object"}, OK),
    "safety_identifier": ("user-1", OK),
    "seed": (7, OK),
    "service_tier": ("auto", OK),
    "stop": (["\n\n"], OK),
    "store": (True, OK),
    "stream": (True, OK),
    "stream_options": ({"include_usage": True}, REFUSED),  # only with stream true, as OpenAI's
    "temperature": (0.5, OK),
    "tool_choice": ("auto", OK),
    "tools": ([TOOL], OK),
    "top_logprobs": (2, REFUSED),  # only with logprobs true, as OpenAI's
    "top_p": (0.9, OK),
    "user": ("user-1", OK),
    "verbosity": ("low", OK),
    "web_search_options": ({"search_context_size": "low"}, REFUSED),
}
COMPLETION_FIELDS: dict[str, tuple[object, str]] = {
    "model": ("tiny", OK),
    "prompt": ("The quick brown fox", OK),
    "best_of": (3, OK),
    "echo": (True, OK),
    "frequency_penalty": (0.5, OK),
    "logit_bias": ({"5": 10}, OK),
    "logprobs": (2, OK),
    "max_tokens": (2, OK),
    "n": (2, OK),
    "presence_penalty": (0.5, OK),
    "seed": (7, OK),
    "stop": ("\n", OK),
    "stream": (True, OK),
    "stream_options": ({"include_usage": True}, REFUSED),
    "suffix": ("the end", REFUSED),
    "temperature": (0.5, OK),
    "top_p": (0.9, OK),
    "user": ("user-1", OK),
}
REQUIRED_NULL_REFUSED = {"messages", "prompt"}  # null is "not set", and these must be set

CHAT_BASE = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
COMPLETION_BASE = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 2}


def sdk_fields(module) -> set[str]:
    """Every key the SDK's request TypedDicts (streaming and not) can carry."""
    fields: set[str] = set()
    for name in ("CompletionCreateParamsNonStreaming", "CompletionCreateParamsStreaming"):
        fields |= set(typing.get_type_hints(getattr(module, name)))
    return fields


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(create_app({"tiny": tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("fidelity") / "tiny"))}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        yield client


def post(http: httpx.Client, path: str, body: dict) -> httpx.Response:
    response = http.post(path, json=body)
    response.read()
    return response


def check(response: httpx.Response, expected: str, field: str) -> None:
    if expected == OK:
        assert response.status_code == 200, (field, response.text)
        return
    assert response.status_code == 400, (field, response.status_code, response.text)
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == field, (field, error)
    assert field in error["message"] or error["code"] == "unsupported_parameter", (field, error)


@pytest.mark.parametrize("module, table", [(chat_create_params, CHAT_FIELDS),
                                           (completion_create_params, COMPLETION_FIELDS)], ids=["chat", "completions"])
def test_every_sdk_field_is_decided(module, table):
    assert sdk_fields(module) == set(table)


@pytest.mark.parametrize("field", sorted(CHAT_FIELDS))
def test_chat_field_null_and_value(http, field):
    null = post(http, "/v1/chat/completions", {**CHAT_BASE, field: None})
    check(null, REFUSED if field in REQUIRED_NULL_REFUSED else OK, field)
    value, expected = CHAT_FIELDS[field]
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, field: value}), expected, field)


@pytest.mark.parametrize("field", sorted(COMPLETION_FIELDS))
def test_completion_field_null_and_value(http, field):
    null = post(http, "/v1/completions", {**COMPLETION_BASE, field: None})
    check(null, REFUSED if field in REQUIRED_NULL_REFUSED else OK, field)
    value, expected = COMPLETION_FIELDS[field]
    check(post(http, "/v1/completions", {**COMPLETION_BASE, field: value}), expected, field)


def test_completion_max_tokens_null_is_openais_16(http):
    body = {**COMPLETION_BASE, "max_tokens": None, "temperature": 0, "ignore_eos": True}
    assert post(http, "/v1/completions", body).json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("effort", typing.get_args(typing.get_args(chat_create_params.ReasoningEffort)[0]))
def test_every_reasoning_effort_of_the_spec_is_accepted(http, effort):
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, "reasoning_effort": effort}), OK, "reasoning_effort")


def test_audio_modality_is_refused_naming_it(http):
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, "modalities": ["text", "audio"]}), REFUSED, "modalities")


def test_sdk_sends_none_as_null_and_it_is_the_default(live):
    """The official client with every nullable argument passed as None (it sends them as null)."""
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=2,
                                          n=None, stream=None, logprobs=None, stop=None, temperature=None,
                                          top_p=None, seed=None, top_logprobs=None, reasoning_effort=None,
                                          frequency_penalty=None, presence_penalty=None, logit_bias=None,
                                          max_completion_tokens=None, stream_options=None)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    text = client.completions.create(model="tiny", prompt="The quick", max_tokens=2, n=None, echo=None,
                                     logprobs=None, best_of=None, stream=None, suffix=None, stop=None)
    assert len(text.choices) == 1 and text.choices[0].logprobs is None


# --- the spec's features that were refused ----------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(http):
    body = {**COMPLETION_BASE, "temperature": 0, "max_tokens": 6, "logprobs": 0, "ignore_eos": True}
    plain = post(http, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
    forced = post(http, "/v1/completions", {**body, "logit_bias": {"7": 100}}).json()["choices"][0]
    assert len(set(forced["logprobs"]["tokens"])) == 1 and forced["logprobs"]["tokens"][0] != plain[0]
    first = post(http, "/tokenize", {"model": "tiny", "prompt": plain[0], "add_special_tokens": False}).json()
    banned = post(http, "/v1/completions", {**body, "logit_bias": {str(first["tokens"][0]): -100}}).json()
    assert banned["choices"][0]["logprobs"]["tokens"][0] != plain[0]


@pytest.mark.parametrize("bias", [{"100000": 1}, {"5": 100.5}, {"five": 1}])
def test_bad_logit_bias_is_a_400_naming_it(http, bias):
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, "logit_bias": bias}), REFUSED, "logit_bias")


def test_best_of_returns_the_n_most_likely_of_its_samples(http):
    body = {**COMPLETION_BASE, "max_tokens": 4, "best_of": 5, "n": 2, "seed": 3, "logprobs": 0}
    out = post(http, "/v1/completions", body).json()
    totals = [sum(choice["logprobs"]["token_logprobs"]) for choice in out["choices"]]
    assert [choice["index"] for choice in out["choices"]] == [0, 1] and totals == sorted(totals, reverse=True)
    every = post(http, "/v1/completions", {**body, "best_of": None, "n": 5}).json()  # the same seeded samples
    every_totals = sorted((sum(c["logprobs"]["token_logprobs"]) for c in every["choices"]), reverse=True)
    assert totals == pytest.approx(every_totals[:2])
    assert out["usage"]["completion_tokens"] == every["usage"]["completion_tokens"]  # every sample is billed
    without = post(http, "/v1/completions", {**body, "logprobs": None}).json()
    assert [c["text"] for c in without["choices"]] == [c["text"] for c in out["choices"]]
    assert all(c["logprobs"] is None for c in without["choices"])


@pytest.mark.parametrize("body, param", [({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of")])
def test_best_of_below_n_or_streamed_is_refused(http, body, param):
    check(post(http, "/v1/completions", {**COMPLETION_BASE, **body}), REFUSED, param)


def test_assistant_refusals_are_accepted_as_its_text(http):
    messages = [{"role": "user", "content": "Hello"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": None, "refusal": "No."},
                {"role": "user", "content": "Ok"}]
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, "messages": messages}), OK, "messages")
    user_refusal = [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]
    check(post(http, "/v1/chat/completions", {**CHAT_BASE, "messages": user_refusal}), REFUSED, "messages")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": {"text": "x"}}, "prompt"),
    ("/v1/completions", {"prompt": [1, "x"]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "function"}},
     "tool_choice"),
])
def test_errors_name_the_field_not_the_union_member_tried(http, path, body, param):
    response = post(http, path, {"model": "tiny", "max_tokens": 2, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    assert response.json()["error"]["message"].startswith(param + ":")
