"""POST /v1/messages through a live server, checked with the official `anthropic` SDK.

Every body and stream event is validated against the SDK's typed models (pydantic validation,
not the SDK's lenient construction), streams are reassembled with the SDK's own accumulator,
and the high-level client (`messages.create`, `.stream`, its exception classes) drives the rest.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from engine.errors import EngineDeadError
from scripted_model import scripted_engine
from server.app import create_app
from server.settings import ServerSettings
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine, wait_until_idle
from test_chat_tools import use_tool_template

pytestmark = pytest.mark.timeout(300)

STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER = {"name": "get_weather", "description": "Weather <today> & tomorrow", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
ADD = {"name": "add", "input_schema": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"]}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
KEY = "sk-messages-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("messages") / "tiny"
    return use_tool_template(save_tiny_llama(directory, max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(model_dir):
    return tiny_engine(model_dir, "tiny")


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app({"tiny": engine}, ServerSettings(api_keys=(KEY,))))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live.base_url, api_key=KEY, max_retries=0, timeout=120)


def post(live, body: dict, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    return httpx.post(live.base_url + path, json=body, timeout=120,
                      headers={"x-api-key": KEY, "anthropic-version": "2023-06-01", **headers})


def message(live, body: dict) -> Message:
    response = post(live, body)
    assert response.status_code == 200, response.text
    return Message.model_validate(response.json())


def stream_events(live, body: dict) -> list[tuple[str, dict]]:
    """(SSE event name, data) of a streamed request, each data's type equal to its event name."""
    events, name = [], None
    with httpx.stream("POST", live.base_url + "/v1/messages", json={**body, "stream": True}, timeout=120,
                      headers={"x-api-key": KEY}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                assert data["type"] == name
                events.append((name, data))
    return events


def reassembled(events: list[tuple[str, dict]]) -> Message:
    """The stream, every event validated by the SDK's types and folded by the SDK's own accumulator,
    after checking Anthropic's order: message_start, ping, well-nested blocks, message_delta, message_stop."""
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"], names
    snapshot, buffers, open_block = None, {}, None
    for name, data in events:
        if name == "ping":
            continue
        event = STREAM_EVENT.validate_python(data)
        if name == "content_block_start":
            assert open_block is None and event.index == (len(snapshot.content) if snapshot else 0)
            open_block = event.index
        elif name in ("content_block_delta", "content_block_stop"):
            assert event.index == open_block
            open_block = None if name == "content_block_stop" else open_block
        elif name == "message_delta":
            assert open_block is None
            stop = event
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    final = Message.model_validate(snapshot.to_dict())
    usage = final.usage.model_copy(update={"output_tokens": stop.usage.output_tokens})
    return final.model_copy(update={"stop_reason": stop.delta.stop_reason, "stop_sequence": stop.delta.stop_sequence,
                                    "usage": usage})


def blocks(message: Message) -> list[dict]:
    """The content blocks without tool_use ids (each request draws new ones)."""
    return [{k: v for k, v in block.to_dict().items() if k != "id"} for block in message.content]


def same_message(streamed: Message, whole: Message) -> None:
    assert blocks(streamed) == blocks(whole)
    assert (streamed.stop_reason, streamed.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.model == whole.model == "tiny" and streamed.role == "assistant"


# --- text ---------------------------------------------------------------------------------------------------


def test_text_message_streamed_equals_whole(live, engine):
    body = {"model": "tiny", "max_tokens": 12, "temperature": 0, "system": [{"type": "text", "text": "Be brief."}],
            "messages": ASK, "metadata": {"user_id": "u1"}}
    whole = message(live, body)
    assert whole.id.startswith("msg_") and whole.type == "message"
    assert [block.type for block in whole.content] == ["text"] and whole.content[0].text
    assert whole.stop_reason in ("max_tokens", "end_turn")
    assert whole.usage.output_tokens <= 12
    same_message(reassembled(stream_events(live, body)), whole)
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_sdk_create_and_stream_agree(client):
    kwargs = dict(model="tiny", max_tokens=10, messages=ASK, extra_body={"temperature": 0, "top_k": 5, "top_p": 0.9})
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        texts = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert texts == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_prefix_cache_hits_are_cache_read_input_tokens(live):
    body = {"model": "tiny", "max_tokens": 2, "temperature": 0, "system": "You answer questions. " * 12,
            "messages": ASK}
    first, second = message(live, body), message(live, body)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total > 32
    assert second.usage.cache_read_input_tokens >= 16 and second.usage.cache_creation_input_tokens == 0
    counted = post(live, {k: v for k, v in body.items() if k != "max_tokens"}, "/v1/messages/count_tokens")
    assert MessageTokensCount.model_validate(counted.json()).input_tokens == total


def test_stop_sequence_is_reported(live):
    body = {"model": "tiny", "max_tokens": 16, "temperature": 0, "messages": ASK}
    text = message(live, body).content[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), text
    stopped = message(live, {**body, "stop_sequences": [stop]})
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)
    assert stopped.content[0].text == text[:text.index(stop)]
    same_message(reassembled(stream_events(live, {**body, "stop_sequences": [stop]})), stopped)


# --- tools --------------------------------------------------------------------------------------------------


def test_forced_tool_gives_schema_valid_input_streamed_equal_to_whole(live, engine):
    body = {"model": "tiny", "max_tokens": 60, "temperature": 0, "messages": ASK, "tools": [WEATHER, ADD],
            "tool_choice": {"type": "tool", "name": "get_weather"}}
    whole = message(live, body)
    assert whole.stop_reason == "tool_use"
    (call,) = whole.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id
    jsonschema.validate(call.input, WEATHER["input_schema"])
    events = stream_events(live, body)
    deltas = [data["delta"]["type"] for name, data in events if name == "content_block_delta"]
    assert deltas.count("input_json_delta") > 2
    same_message(reassembled(events), whole)
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_any_tool_choice_without_parallel_use_makes_one_call(client):
    out = client.messages.create(model="tiny", max_tokens=120, extra_body={"temperature": 0}, messages=ASK,
                                 tools=[WEATHER, ADD], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    calls = [block for block in out.content if block.type == "tool_use"]
    assert out.stop_reason == "tool_use" and len(calls) == 1
    jsonschema.validate(calls[0].input, {t["name"]: t["input_schema"] for t in (WEATHER, ADD)}[calls[0].name])


ANSWER = "It is sunny in Paris."
SCRIPT = 'I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted(model_dir):
    """A server whose model writes SCRIPT after the first <|assistant|> token of a prompt and ANSWER after a
    later one (once its call is in the conversation), then </s>."""
    engine = scripted_engine(model_dir, [SCRIPT, ANSWER], max_model_len=1024, num_blocks=192)
    server = LiveServer(create_app({"scripted": engine}))
    yield server
    server.stop()


def test_auto_tool_call_and_tool_loop(scripted):
    client = anthropic.Anthropic(base_url=scripted.base_url, api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model="scripted", max_tokens=200, extra_body={"temperature": 0}, tools=[WEATHER])
    first = client.messages.create(messages=ASK, **kwargs)
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"] and first.content[0].text == "I will look."
    call = first.content[1]
    assert (call.name, call.input) == ("get_weather", {"city": "Paris", "days": 2})
    with client.messages.stream(messages=ASK, **kwargs) as stream:
        streamed = stream.get_final_message()
    assert blocks(streamed) == blocks(first)
    assert streamed.stop_reason == "tool_use"

    loop = ASK + [{"role": "assistant", "content": [b.to_dict() for b in first.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    answer = client.messages.create(messages=loop, **kwargs)
    assert answer.stop_reason == "end_turn" and [(b.type, b.text) for b in answer.content] == [("text", ANSWER)]
    assert answer.usage.input_tokens + answer.usage.cache_read_input_tokens > first.usage.input_tokens + 20
    assert answer.usage.cache_read_input_tokens > 0  # the first turn's prompt was read from the prefix cache
    none = client.messages.create(messages=ASK, tool_choice={"type": "none"}, **kwargs)
    assert none.stop_reason == "end_turn" and [b.type for b in none.content] == ["text"]
    assert none.content[0].text == SCRIPT


# --- errors, keys and headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, kind, field", [
    ({"model": "nope", "max_tokens": 4, "messages": ASK}, 404, "not_found_error", "nope"),
    ({"model": "tiny", "messages": ASK}, 400, "invalid_request_error", "max_tokens"),
    ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
     400, "invalid_request_error", "messages.0.content.1"),
    ({"model": "tiny", "max_tokens": 4, "messages": ASK, "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "x"}}, 400, "invalid_request_error", "tool_choice.name"),
    ({"model": "tiny", "max_tokens": 4, "messages": ASK, "tools": [WEATHER, WEATHER]}, 400, "invalid_request_error",
     "tool names must be unique"),
    ({"model": "tiny", "max_tokens": 4, "messages": ASK + [{"role": "assistant", "content": "It is"}]},
     400, "invalid_request_error", "prefill"),
    ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x" * 5000}]},
     400, "invalid_request_error", "context length"),
])
def test_errors_in_anthropic_shape(live, engine, body, status, kind, field):
    for streamed in (False, True):
        response = post(live, {**body, "stream": streamed})
        assert response.status_code == status, response.text
        error = ErrorResponse.model_validate(response.json())
        assert error.type == "error" and error.error.type == kind and field in error.error.message
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_sdk_raises_its_own_error_classes(client):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])


def test_keys_from_x_api_key_or_bearer_and_beta_headers_accepted(live):
    body = {"model": "tiny", "max_tokens": 2, "messages": ASK}
    assert post(live, body, **{"anthropic-beta": "interleaved-thinking-2025-05-14"}).status_code == 200
    bearer = httpx.post(live.base_url + "/v1/messages?beta=true", json=body, timeout=60,
                        headers={"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"})
    assert bearer.status_code == 200, bearer.text
    refused = httpx.post(live.base_url + "/v1/messages", json=body, headers={"x-api-key": "wrong"}, timeout=60)
    assert refused.status_code == 401
    assert ErrorResponse.model_validate(refused.json()).error.type == "authentication_error"
    openai_shape = httpx.post(live.base_url + "/v1/chat/completions", json={}, headers={"x-api-key": "wrong"})
    assert openai_shape.status_code == 401 and openai_shape.json()["error"]["code"] == "invalid_api_key"


def test_beta_client_and_count_tokens_through_the_sdk(client):
    beta = client.beta.messages.create(model="tiny", max_tokens=3, messages=ASK,
                                       betas=["token-efficient-tools-2025-02-19"])
    counted = client.messages.count_tokens(model="tiny", messages=ASK, tools=[WEATHER])
    plain = client.messages.count_tokens(model="tiny", messages=ASK)
    assert beta.usage.input_tokens + (beta.usage.cache_read_input_tokens or 0) == plain.input_tokens
    assert counted.input_tokens > plain.input_tokens  # the tools are rendered into the prompt


class DyingEngine:
    """The tiny engine, except that every request's stream breaks after its first output (the engine "dies")."""

    def __init__(self, engine) -> None:
        self.inner = engine

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, prompt, params, request_id):
        async for output in self.inner.generate(prompt, params, request_id):
            yield output
            raise EngineDeadError("stopped in the middle of a stream (test)")


def test_an_error_mid_stream_is_an_anthropic_error_event(model_dir):
    engine = tiny_engine(model_dir, "tiny")
    server = LiveServer(create_app({"tiny": DyingEngine(engine)}))
    try:
        events, name = [], None
        body = {"model": "tiny", "max_tokens": 8, "messages": ASK, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/messages", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                name = line.removeprefix("event: ") if line.startswith("event: ") else name
                if line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
        assert [n for n, _ in events][:2] == ["message_start", "ping"] and events[-1][0] == "error"
        error = ErrorResponse.model_validate(events[-1][1])
        assert error.error.type == "overloaded_error" and "not running" in error.error.message
        client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(anthropic.APIStatusError, match="not running"):
            with client.messages.stream(model="tiny", max_tokens=8, messages=ASK) as stream:
                stream.get_final_message()
        assert wait_until_idle(engine).kv_blocks_used == 0
    finally:
        server.stop()
