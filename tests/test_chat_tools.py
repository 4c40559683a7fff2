"""Tools, tool_choice and response_format through a live server and the official openai client.

References nobody here wrote: transformers' `apply_chat_template` for how tools and tool
results render, `jsonschema` for whether constrained outputs match their schemas, and the
openai client's parsing for the wire shapes (streamed tool-call deltas included).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.builder import engine_for_model
from engine.tokenizer import Tokenizer
from fake_model import FakeModel
from server.app import create_app
from server.chat import conversation_of
from server.conversation import render_prompt
from server.protocol import ChatCompletionRequest
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine, wait_until_idle

pytestmark = pytest.mark.timeout(300)

# A hermes-style template in the shape of Qwen2.5's: tools as JSON in the system turn, calls and results tagged.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>Tools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response></s>"
    "{% elif m.tool_calls %}<|assistant|>{{ m.content }}{% for c in m.tool_calls %}<tool_call>{\"name\": "
    "\"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}</s>"
    "{% else %}<|{{ m.role }}|>{{ m.content }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <today> & tomorrow",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                  "required": ["a", "b"]}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def use_tool_template(directory: Path) -> Path:
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return use_tool_template(save_tiny_llama(tmp_path_factory.mktemp("tools") / "tiny", max_position_embeddings=1024))


@pytest.fixture(scope="module")
def engine(model_dir):
    return tiny_engine(model_dir, "tiny")


@pytest.fixture(scope="module")
def live(engine):
    server = LiveServer(create_app({"tiny": engine}))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


# --- rendering --------------------------------------------------------------------------------------------


def test_tools_and_tool_results_render_as_transformers_renders_them(model_dir, engine):
    from transformers import AutoTokenizer

    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = ChatCompletionRequest(model="tiny", messages=messages, tools=[WEATHER, ADD])
    ours = render_prompt(engine, conversation_of(body))
    hf_messages = [dict(m) for m in messages]
    hf_messages[1] = {**messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]}
    reference = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        hf_messages, tools=[WEATHER, ADD], add_generation_prompt=True, tokenize=False)
    assert "<today> & tomorrow" in reference and "<tool_response>sunny" in reference
    assert engine.tokenizer.decode(ours, skip_special_tokens=False) == reference


def test_tool_call_arguments_that_are_not_json_render_as_the_text_they_are(model_dir, engine, client):
    """A call cut by max_tokens comes back in history as the model wrote it: passed to the template as text."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "cut"}]
    ours = render_prompt(engine, conversation_of(ChatCompletionRequest(model="tiny", messages=messages, tools=[ADD])))
    reference = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, tools=[ADD], add_generation_prompt=True, tokenize=False)
    assert engine.tokenizer.decode(ours, skip_special_tokens=False) == reference
    out = client.chat.completions.create(model="tiny", max_tokens=2, messages=messages, tools=[ADD])
    assert out.choices[0].finish_reason in ("length", "stop", "tool_calls")


# --- constrained decoding ---------------------------------------------------------------------------------


def test_named_tool_choice_yields_valid_arguments_streamed_equal_to_unstreamed(client, live, engine):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=[WEATHER, ADD], temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    plain = client.chat.completions.create(**kwargs)
    choice = plain.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI's for a forced function
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    heads = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or []) if tc.id]
    assert len(heads) == 1 and heads[0].function.name == "get_weather" and heads[0].function.arguments == ""
    arguments = "".join(tc.function.arguments or "" for c in chunks for tc in (c.choices[0].delta.tool_calls or []))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2  # fragments, as generated
    assert arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_required_tool_choice_without_parallel_calls_makes_one_declared_call(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, ADD], max_tokens=120,
                                         tool_choice="required", parallel_tool_calls=False, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert len(choice.message.tool_calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_json_object_is_an_object(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, seed=3,
                                         response_format={"type": "json_object"})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert out.choices[0].message.content.startswith("{")


LEAVES = st.sampled_from([
    {"type": "boolean"}, {"type": "null"}, {"enum": ["red", "green", 7]},
    {"type": "integer", "minimum": -5, "maximum": 500}, {"type": "string", "maxLength": 4},
    {"type": "string", "pattern": "^[a-c]{1,3}$"}, {"const": "fixed"},
])
SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, min_size=1, max_size=3).map(
            lambda props: {"type": "object", "properties": props, "required": sorted(props),
                           "additionalProperties": False}),
        inner.map(lambda item: {"type": "array", "items": item, "minItems": 1, "maxItems": 2}),
    ),
    max_leaves=4,
).filter(lambda schema: schema.get("type") in ("object", "array"))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(SCHEMAS, st.integers(0, 2**16))
def test_json_schema_outputs_validate(client, schema, seed):
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=150, seed=seed, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "minLength": 5, "maxLength": 2}}}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_unusable_tool_and_schema_requests_are_400_naming_the_field(client, engine, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **body)
    assert caught.value.param == param
    assert wait_until_idle(engine).kv_blocks_used == 0


def test_max_tokens_beyond_the_context_is_clamped_to_what_fits(client, engine):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=32000, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == engine.max_model_len
    with pytest.raises(openai.BadRequestError) as caught:  # a prompt that alone fills the context stays a 400
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox " * 1200}])
    assert caught.value.code == "context_length_exceeded"


# --- auto tool choice: a model scripted to answer with a hermes call --------------------------------------

SCRIPT_IDS: list[int] = []
SCRIPT = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
          '</tool_call>')


@pytest.fixture(scope="module")
def scripted(model_dir):
    """A server whose model writes SCRIPT after the last <|assistant|> token, then </s>."""
    tokenizer = Tokenizer.from_files({name: model_dir / name for name in ("tokenizer.json", "tokenizer_config.json")})
    script = SCRIPT_IDS[:] = tokenizer.encode(SCRIPT, add_special_tokens=False)
    assistant, eos = tokenizer.backend.token_to_id("<|assistant|>"), tokenizer.backend.token_to_id("</s>")

    def predict(context: list[int], vocab_size: int) -> int:
        written = len(context) - 1 - max(i for i, t in enumerate(context) if t == assistant)
        return script[written] if written < len(script) else eos

    info = SimpleNamespace(architecture="llama", path=str(model_dir), to_dict=lambda: {})
    llm = engine_for_model(FakeModel(tokenizer.vocab_size, predict), tokenizer, EngineConfig(block_size=16),
                    max_model_len=512, model_info=info, num_blocks=64)
    server = LiveServer(create_app({"scripted": AsyncEngine(llm)}))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    server.stop()


def test_auto_tool_call_parsed_and_streamed_in_openai_shape(scripted):
    kwargs = dict(model="scripted", messages=MESSAGES, tools=[WEATHER], max_tokens=200, temperature=0)
    plain = scripted.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "tool_calls", plain.message
    assert plain.message.content == "I will look."
    (call,) = plain.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris", "days": 2})

    chunks = list(scripted.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == plain.message.content
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == len(SCRIPT_IDS) + 1  # the script and its </s>

    none = scripted.chat.completions.create(**kwargs, tool_choice="none").choices[0]
    assert none.message.tool_calls is None and none.message.content == SCRIPT and none.finish_reason == "stop"
