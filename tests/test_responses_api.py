"""POST /v1/responses through the real HTTP server, checked with the official openai SDK's types.

A tiny random Llama (with a hermes-style tool template) serves text, forced calls and formats;
a scripted model serves the tool loop (it calls a tool, then answers once it sees the result).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from responses_testing import check_stream, post_stream, valid_response, without_ids
from scripted_model import scripted_engine
from server.app import create_app
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine, wait_until_idle
from test_chat_tools import use_tool_template

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather today",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}}
CODE = {"type": "custom", "name": "code", "description": "three letters",
        "format": {"type": "grammar", "syntax": "regex", "definition": "[abc]{3}"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return use_tool_template(save_tiny_llama(tmp_path_factory.mktemp("responses") / "tiny",
                                             max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(model_dir):
    return tiny_engine(model_dir, "tiny")


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app({"tiny": engine}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(live):
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(live):
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def create(http: httpx.Client, body: dict) -> dict:
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    valid_response(response.json())
    return response.json()


def test_text_streamed_equals_non_streamed_and_the_sdk_reads_both(http, sdk, engine):
    body = {"model": "tiny", "input": "Hello there", "instructions": "Be brief.", "max_output_tokens": 12,
            "temperature": 0}
    plain = create(http, body)
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = plain["output"]
    assert message["type"] == "message" and message["content"][0]["type"] == "output_text"
    assert plain["usage"]["output_tokens"] == 12
    final = check_stream(post_stream(http, body))
    assert without_ids(final["output"]) == without_ids(plain["output"])
    assert final["usage"]["output_tokens"] == plain["usage"]["output_tokens"]

    typed = sdk.responses.create(**body)
    assert typed.output_text == message["content"][0]["text"]
    with sdk.responses.stream(**body) as stream:
        events = list(stream)
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert events[-1].type == "response.incomplete"  # (the SDK's get_final_response wants response.completed)
    assert deltas == events[-1].response.output_text == typed.output_text
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_forced_function_call_has_schema_valid_arguments_streamed_equal_to_non_streamed(http):
    body = {"model": "tiny", "input": "Weather in Paris?", "tools": [WEATHER, {"type": "web_search"}],
            "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 120, "temperature": 0}
    plain = create(http, body)
    (call,) = plain["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["parameters"])
    assert [tool["name"] for tool in plain["tools"]] == ["get_weather"]  # the built-in one was skipped
    events = post_stream(http, body)
    assert any(e["type"] == "response.function_call_arguments.delta" for e in events)
    assert without_ids(check_stream(events)["output"]) == without_ids(plain["output"])


def test_forced_custom_tool_follows_its_grammar(http):
    for definition, pattern in (("[abc]{3}", r"[abc]{3}"), ('start: "x" DIGIT DIGIT\n%import common.DIGIT', r"x\d\d")):
        tool = {**CODE, "format": {"type": "grammar", "syntax": "regex" if "start" not in definition else "lark",
                                   "definition": definition}}
        body = {"model": "tiny", "input": "Write code", "tools": [tool], "max_output_tokens": 20,
                "tool_choice": {"type": "custom", "name": "code"}, "temperature": 0}
        (call,) = create(http, body)["output"]
        assert call["type"] == "custom_tool_call" and re.fullmatch(pattern, call["input"]), call
        events = post_stream(http, body)
        assert events[-2]["item"]["input"] == call["input"]
        assert any(e["type"] == "response.custom_tool_call_input.delta" for e in events)
        check_stream(events)


def test_json_schema_format_validates(http):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    body = {"model": "tiny", "input": "A number", "max_output_tokens": 40, "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "num", "schema": schema, "strict": True}}}
    plain = create(http, body)
    jsonschema.validate(json.loads(plain["output"][0]["content"][0]["text"]), schema)
    assert plain["text"]["format"]["type"] == "json_schema"
    body["text"] = {"format": {"type": "json_object"}}
    assert isinstance(json.loads(create(http, body)["output"][0]["content"][0]["text"]), dict)


def test_prefix_cache_hits_are_reported_as_cached_tokens(http):
    words = " ".join(f"w{i}" for i in range(60))
    body = {"model": "tiny", "input": f"Remember {words}", "max_output_tokens": 2, "temperature": 0}
    first = create(http, body)["usage"]
    second = create(http, body)["usage"]
    assert first["input_tokens"] == second["input_tokens"] > 32
    assert second["input_tokens_details"]["cached_tokens"] >= 32  # full 16-token blocks of the repeated prompt
    assert second["input_tokens_details"]["cached_tokens"] % 16 == 0


@pytest.mark.parametrize("body, status, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input.0.content.0.type"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "hi", "tools": [WEATHER, WEATHER]}, 400, "tools"),
    ({"input": "hi", "previous_response_id": "resp_missing"}, 404, "previous_response_id"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input.0.type"),
    ({"input": [{"type": "function_call", "name": "f"}]}, 400, "input.0.call_id"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
    ({"input": "hi", "tools": [{**CODE, "format": {"type": "grammar", "syntax": "regex", "definition": "("}}],
      "tool_choice": {"type": "custom", "name": "code"}}, 400, "tools.0.format.definition"),
    ({"input": "hi", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "hi", "model": "other"}, 404, "model"),
])
def test_bad_requests_are_errors_in_openai_shape_naming_the_field(http, body, status, param):
    response = http.post("/v1/responses", json={"model": "tiny", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_built_in_tools_and_unknown_items_are_skipped_not_refused(http):
    body = {"model": "tiny", "max_output_tokens": 2, "tools": [{"type": "web_search_preview"}, {"type": "local_shell"}],
            "tool_choice": {"type": "web_search_preview"},
            "input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"},
                      {"role": "user", "content": "hi"}]}
    assert create(http, body)["tools"] == []


# --- the tool loop, on a scripted model ---------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
ANSWER = "It is sunny."


@pytest.fixture(scope="module")
def scripted(model_dir):
    """Writes CALL after the first <|assistant|> of a prompt and ANSWER once an assistant turn (the call) is in it."""
    server = LiveServer(create_app({"scripted": scripted_engine(model_dir, [CALL, ANSWER])}))
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client
    server.stop()


def test_tool_loop_call_then_output_then_answer(scripted):
    body = {"model": "scripted", "input": "Weather in Paris?", "tools": [WEATHER], "temperature": 0}
    first = create(scripted, body)
    (call,) = first["output"]
    assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"city": "Paris", "days": 2}
    streamed = check_stream(post_stream(scripted, body))
    assert without_ids(streamed["output"]) == without_ids(first["output"])

    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny, 24C"}
    chained = create(scripted, {**body, "input": [result], "previous_response_id": first["id"]})
    assert chained["output"][0]["content"][0]["text"] == ANSWER and chained["status"] == "completed"
    stateless = create(scripted, {**body, "store": False,
                                  "input": [{"role": "user", "content": "Weather in Paris?"}, call, result]})
    assert stateless["output"][0]["content"][0]["text"] == ANSWER
    image = {**result, "output": [{"type": "input_text", "text": "the map:"},
                                  {"type": "input_image", "image_url": "x"}]}
    shown = create(scripted, {**body, "input": [{"role": "user", "content": "Weather in Paris?"}, call, image]})
    assert shown["output"][0]["content"][0]["text"] == ANSWER  # an image in a tool output does not end the loop
    items = scripted.get(f"/v1/responses/{shown['id']}/input_items", params={"order": "asc"}).json()["data"]
    assert items[-1]["output"] == "the map:[input_image left out: this model reads text only]"

    grouped = {"type": "namespace", "name": "weather_v1", "description": "Weather tools", "tools": [WEATHER]}
    (namespaced,) = create(scripted, {**body, "tools": [grouped]})["output"]
    assert (namespaced["name"], namespaced["namespace"]) == ("get_weather", "weather_v1")
    assert chained["usage"]["input_tokens"] == stateless["usage"]["input_tokens"]


def test_sdk_tool_loop_with_previous_response_id_and_typed_stream(scripted):
    sdk = openai.OpenAI(base_url=str(scripted.base_url) + "/v1", api_key="unused", max_retries=0, timeout=60)
    first = sdk.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER], temperature=0)
    (call,) = first.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    with sdk.responses.stream(model="scripted", previous_response_id=first.id, tools=[WEATHER], temperature=0,
                              input=[result]) as s:
        kinds = [event.type for event in s]
        answer = s.get_final_response()
    assert answer.output_text == ANSWER and answer.previous_response_id == first.id
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] == "response.completed"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.retrieve("resp_unknown")
    assert missing.value.code == "response_not_found"


def test_reasoning_items_reach_the_assistant_turn_and_harmony_renders_them():
    pytest.importorskip("openai_harmony")
    from server.conversation.harmony import harmony_encoding, render_harmony
    from server.responses_api.items import canonical_items
    from server.responses_api.request import ResponsesRequest
    from server.responses_api.sealing import ReasoningSeal
    from server.responses_api.translate import conversation_of, served_tools

    seal = ReasoningSeal.from_environment()
    body = ResponsesRequest(instructions="Be exact.", tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "encrypted_content": seal.seal("I should call get_weather.")},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    conversation = conversation_of(body, canonical_items(body.input, seal), served_tools(body.tools))
    assert [turn.role for turn in conversation.turns] == ["developer", "user", "assistant", "tool"]
    assistant, tool = conversation.turns[2:]
    assert assistant.reasoning == "I should call get_weather." and assistant.tool_calls[0].name == "get_weather"
    assert (tool.call_id, tool.name, tool.text) == ("c1", "get_weather", "sunny")
    prompt = harmony_encoding().decode(render_harmony(conversation))
    assert "<|channel|>analysis<|message|>I should call get_weather." in prompt
