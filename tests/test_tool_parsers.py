"""Tool-call parsers on real-format completions of each family, including malformed and truncated ones,
and the streamed deltas of any chunking reassembling to the non-streamed message."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.chat import assistant_message, chat_delta
from server.conversation import TextDelta, ToolCallArguments, ToolCallStart, fold
from server.conversation.parsing import ToolCallStream, call_events, finish_reason, parse_completion
from server.tool_parsers import (HermesParser, Llama3JsonParser, MistralParser, NamedFunctionParser,
                                 RequiredToolsParser, detect_parser_name)


def calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("text, content, expected", [
    # Qwen2.5 / Hermes: one object per tag, text before it
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    # two parallel calls
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n'
     '</tool_call>', "\n", [("a", {}), ("b", {"x": 1})]),
    # SmolLM2: a list inside one tag
    ('<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "neg", "arguments": {"a": 3}}]</tool_call>',
     "", [("add", {"a": 1, "b": 2}), ("neg", {"a": 3})]),
    # arguments written as a JSON string
    ('<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>', "", [("f", {"q": "x"})]),
    # unclosed final tag (the model stopped right after the JSON)
    ('<tool_call>{"name": "f", "arguments": {"q": 1}}', "", [("f", {"q": 1})]),
    # malformed and truncated: plain content, no calls
    ('<tool_call>{"name": "f", "arguments": {"q": </tool_call>', '<tool_call>{"name": "f", "arguments": {"q": </tool_call>', []),
    ('<tool_call>{"name": "f", "argum', '<tool_call>{"name": "f", "argum', []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    ("no call at all", "no call at all", []),
])
def test_hermes(text, content, expected):
    parsed = HermesParser().parse(text)
    assert calls(parsed) == expected
    assert parsed.content == content


@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"n": 2}}',
     [("f", {}), ("g", {"n": 2})]),
    ('  {"name": "f", "arguments": {"a": [1]}}', [("f", {"a": [1]})]),
])
def test_llama3_json(text, expected):
    parsed = Llama3JsonParser().parse(text)
    assert calls(parsed) == expected and parsed.content == ""


@pytest.mark.parametrize("text", [
    '{"name": "f", "parameters": {"a": ', 'The answer is {"name": "f"}', '{"name": "f", "parameters": {}} and more',
    '{"not": "a call"}', "",
])
def test_llama3_json_malformed_is_content(text):
    parsed = Llama3JsonParser().parse(text)
    assert parsed.tool_calls == [] and parsed.content == text


@pytest.mark.parametrize("text, content, expected", [
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [("get_weather", {"city": "Paris"})]),
    ('Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1}', "Sure. ",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {', '[TOOL_CALLS][{"name": "f", "arguments": {', []),
    ('[TOOL_CALLS]f[ARGS]{"a": ', '[TOOL_CALLS]f[ARGS]{"a": ', []),
])
def test_mistral(text, content, expected):
    parsed = MistralParser().parse(text)
    assert calls(parsed) == expected and parsed.content == content


def test_forced_parsers():
    named = NamedFunctionParser("f").parse('{"a": 1}')
    assert calls(named) == [("f", {"a": 1})]
    required = RequiredToolsParser().parse('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]')
    assert calls(required) == [("f", {"a": 1}), ("g", {})]
    cut = RequiredToolsParser().parse('[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {"b":')
    assert cut.content == "" and [(c.name, c.arguments) for c in cut.tool_calls] == [("f", '{"a": 1}'), ("g", '{"b":')]
    assert RequiredToolsParser().parse('[{"name": "f').tool_calls == []


def test_parallel_false_keeps_one_call_and_finish_reasons():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    parser = HermesParser()
    parsed = parse_completion(parser, text, parallel=False)
    assert [c.name for c in parsed.tool_calls] == ["a"]
    assert finish_reason(parser, parsed, "stop") == "tool_calls"
    assert finish_reason(parser, parsed, "length") == "length"
    assert finish_reason(NamedFunctionParser("a"), parsed, "stop") == "stop"  # OpenAI's for a forced function
    message = message_of(parsed)
    assert message["content"] is None and message["tool_calls"][0]["function"] == {"name": "a", "arguments": "{}"}


def message_of(parsed):
    """The non-streamed chat message of a whole completion's split."""
    return assistant_message(fold([TextDelta(parsed.content)] + call_events(parsed)))


@pytest.mark.parametrize("template, name", [
    ("{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %} <tool_call>", "hermes"),
    ("{{ '[AVAILABLE_TOOLS]' }}[TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|><|python_tag|>", "llama3_json"),
    ("<|im_start|>{{ m.content }}", "hermes"),
])
def test_parser_detection(template, name):
    assert detect_parser_name(template) == name


COMPLETIONS = [
    'Checking the weather.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>',
    '<tool_call>{"name": "f", "arguments": {"q": "<tool"}}</tool_call> trailing words',
    "Just an answer with <tool_ in it and no call.",
    '<tool_call>{"name": "f", "argu',
    "  \n",
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(COMPLETIONS), st.lists(st.integers(1, 12), min_size=1, max_size=40),
       st.sampled_from(["hermes", "llama3_json", "mistral"]), st.booleans())
def test_streamed_deltas_reassemble_to_the_message(text, cuts, family, parallel):
    parser = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser}[family]()
    stream = ToolCallStream(parser, parallel)
    deltas, position = [], 0
    for size in cuts:
        deltas += stream.feed(text[position:position + size])
        position += size
    deltas += stream.feed(text[position:])
    more, _ = stream.finish()
    deltas = [chat_delta(event) for event in deltas + more]
    content = "".join(d.get("content", "") for d in deltas)
    streamed_calls: dict[int, dict] = {}
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            entry = streamed_calls.setdefault(call["index"], {"name": "", "arguments": ""})
            if "id" in call:
                assert call["type"] == "function" and call["function"]["arguments"] == ""  # OpenAI's first delta
                entry["name"] = call["function"]["name"]
            entry["arguments"] += call["function"]["arguments"]
    expected = message_of(parse_completion(parser, text, parallel))
    assert (content or None) == (expected["content"] or None)
    assert [streamed_calls[i] for i in sorted(streamed_calls)] == [
        c["function"] for c in expected.get("tool_calls", [])]


def test_named_function_arguments_stream_as_generated():
    stream = ToolCallStream(NamedFunctionParser("f"), True)
    start, first = stream.feed('{"a"')
    assert isinstance(start, ToolCallStart) and (start.index, start.name) == (0, "f")
    assert first == ToolCallArguments(0, '{"a"')
    assert stream.feed(": 1}") == [ToolCallArguments(0, ": 1}")]
    assert stream.finish()[0] == []


def test_tool_call_parser_flag_reaches_the_settings():
    from server.cli import build_parser
    from server.launch import server_settings

    args = build_parser().parse_args(["serve", "m.gguf", "--tool-call-parser", "mistral"])
    assert server_settings(args).tool_call_parser == "mistral"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m.gguf", "--tool-call-parser", "nonsense"])
