"""Forced tool calls cut by max_tokens, and the schema's property order, through a live server and the openai client.

A call cut by a limit still comes back as a call (arguments as generated, finish "length"), never as the
grammar's raw text in `content`, and the history holding it can be sent back.
"""

from __future__ import annotations

import json

import openai
import pytest

from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine, wait_until_idle
from test_chat_tools import ADD, MESSAGES, WEATHER, use_tool_template

pytestmark = pytest.mark.timeout(300)
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return tiny_engine(use_tool_template(save_tiny_llama(tmp_path_factory.mktemp("cut") / "tiny", max_position_embeddings=1024)))


@pytest.fixture(scope="module")
def client(engine):
    server = LiveServer(create_app({"tiny": engine}))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()


def replay(client, message) -> None:
    """The assistant turn sent back with a result for each call: accepted."""
    calls = [call.model_dump() for call in message.tool_calls]
    history = MESSAGES + [{"role": "assistant", "content": message.content, "tool_calls": calls}]
    history += [{"role": "tool", "tool_call_id": call["id"], "content": "ok"} for call in calls]
    client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER, ADD], max_tokens=2)


@pytest.mark.parametrize("max_tokens", [1, 4])
def test_named_call_cut_by_max_tokens_is_a_call_that_replays(client, engine, max_tokens):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, ADD], tool_choice=NAMED, temperature=0,
                  max_tokens=max_tokens)
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    fragments = [tc.function.arguments or "" for c in streamed for tc in (c.choices[0].delta.tool_calls or [])]
    assert "".join(fragments) == call.function.arguments
    replay(client, choice.message)
    assert wait_until_idle(engine).kv_blocks_used == 0


@pytest.mark.parametrize("max_tokens", [2, 6, 12, 24])
def test_required_calls_cut_by_max_tokens_keep_their_calls_and_no_grammar_text(client, max_tokens):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, ADD], tool_choice="required", temperature=0,
                  max_tokens=max_tokens)
    out = client.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.content  # the grammar's `[{"name": ...` is never content
    for call in choice.message.tool_calls or []:
        assert call.function.name in ("get_weather", "add")
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    heads = [tc.function.name for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.id]
    assert heads == [call.function.name for call in choice.message.tool_calls or []]
    if choice.message.tool_calls:
        replay(client, choice.message)


def test_required_call_with_a_written_name_survives_the_cut(client):
    """Long enough to write a name, too short to close the call: the call is there with its partial arguments."""
    for max_tokens in range(8, 40, 4):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, ADD], temperature=0,
                                             tool_choice="required", max_tokens=max_tokens)
        calls = out.choices[0].message.tool_calls or []
        if out.choices[0].finish_reason == "length" and calls:
            last = calls[-1].function.arguments
            with pytest.raises(json.JSONDecodeError):
                json.loads(last) if last else json.loads("{")
            return
    pytest.fail("no cut landed inside a call's arguments")


def test_json_schema_keeps_the_schemas_property_order(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["reasoning", "answer", "confidence"],
              "properties": {"reasoning": {"type": "string", "maxLength": 6}, "answer": {"type": "string", "maxLength": 4},
                             "confidence": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for seed in range(4):
        out = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=120, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        assert list(json.loads(out.choices[0].message.content)) == ["reasoning", "answer", "confidence"]
