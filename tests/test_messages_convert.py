"""Unit tests of the Messages protocol module: request -> conversation, and core events -> content blocks.

The block renderer is checked against the `anthropic` SDK: any stream of core events renders to
stream events that validate as the SDK's types and that the SDK's own accumulator folds into
exactly the non-streamed content.
"""

from __future__ import annotations

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from server.conversation import Finish, ReasoningDelta, TextDelta, ToolCallArguments, ToolCallStart, Usage
from server.errors import APIError
from server.messages.blocks import ContentBlocks, anthropic_usage
from server.messages.convert import conversation_of
from server.messages.protocol import MessagesRequest
from server.messages.routes import error_events

STREAM_EVENT = TypeAdapter(RawMessageStreamEvent)
TOOL = {"name": "read", "description": "Read a file", "input_schema": {
    "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


def request(**fields) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **fields})


def refused(**fields) -> APIError:
    with pytest.raises(APIError) as caught:
        conversation_of(request(**fields))
    return caught.value


def test_system_blocks_turns_and_a_tool_loop_map_onto_the_core():
    conversation = conversation_of(request(
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Use tools."}],
        tools=[TOOL, {"type": "web_search_20250305", "name": "web_search"}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "Read a"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "sealed"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "hello"}]},
                {"type": "text", "text": "And now?"}]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}]))
    assert [(t.role, t.text) for t in conversation.turns] == [
        ("system", "You are terse.\nUse tools."), ("user", "<reminder>\nRead a"), ("assistant", "Reading."),
        ("tool", "hello"), ("user", "And now?"), ("system", "# Environment")]
    assistant, tool = conversation.turns[2], conversation.turns[3]
    assert assistant.reasoning == "I should read it."
    calls = [(c.call_id, c.name, c.arguments_object()) for c in assistant.tool_calls]
    assert calls == [("toolu_1", "read", {"path": "a"})]
    assert (tool.call_id, tool.name) == ("toolu_1", "read")
    assert [t.name for t in conversation.tools] == ["read"]  # the server tool is Anthropic's to run: skipped
    assert conversation.tools[0].schema == TOOL["input_schema"] and conversation.tool_mode == "auto"


@pytest.mark.parametrize("choice, mode, named, parallel", [
    ({"type": "auto"}, "auto", None, True),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", None, False),
    ({"type": "tool", "name": "read"}, "named", "read", True),
    ({"type": "none"}, "none", None, True),
])
def test_tool_choice(choice, mode, named, parallel):
    conversation = conversation_of(request(tools=[TOOL], tool_choice=choice,
                                           messages=[{"role": "user", "content": "x"}]))
    assert conversation.tool_mode == mode and conversation.parallel_tool_calls == parallel
    assert (conversation.named_tool.name if conversation.named_tool else None) == named


@pytest.mark.parametrize("fields, effort", [
    ({}, None), ({"thinking": {"type": "adaptive"}}, None), ({"thinking": {"type": "disabled"}}, "none"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "low"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8000}}, "medium"),
    ({"thinking": {"type": "enabled", "budget_tokens": 32000}}, "high"),
    ({"thinking": {"type": "enabled", "budget_tokens": 32000}, "output_config": {"effort": "low"}}, "low"),
    ({"output_config": {"effort": "max"}}, "max"),
])
def test_thinking_budget_and_effort_map_to_reasoning_effort(fields, effort):
    assert conversation_of(request(messages=[{"role": "user", "content": "x"}], **fields)).reasoning_effort == effort


def test_output_config_format_constrains_the_text():
    conversation = conversation_of(request(messages=[{"role": "user", "content": "x"}], output_config={
        "format": {"type": "json_schema", "schema": {"type": "object"}}}))
    assert conversation.output_format is not None and conversation.output_format_param == "output_config.format.schema"


@pytest.mark.parametrize("fields, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "messages.0.content.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "x", "input": {}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages.1"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "t"}]}, "tools.0"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL, TOOL]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": {"type": "tool", "name": "w"}},
     "tool_choice.name"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
])
def test_what_cannot_be_used_is_a_400_naming_the_field(fields, param):
    error = refused(**fields)
    assert (error.status, error.param) == (400, param)


EVENTS = st.lists(st.one_of(
    st.text(min_size=1, max_size=5).map(TextDelta), st.text(min_size=1, max_size=5).map(ReasoningDelta),
    st.just("call")), max_size=12)


def core_events(draw_list: list) -> list:
    """Text, reasoning and whole calls (a start, then its JSON in fragments) in the drawn order, then a finish."""
    events, calls = [], 0
    for item in draw_list:
        if item == "call":
            events += [ToolCallStart(calls, f"toolu_{calls}", "read"), ToolCallArguments(calls, '{"path": '),
                       ToolCallArguments(calls, f'"f{calls}.txt"'), ToolCallArguments(calls, "}")]
            calls += 1
        else:
            events.append(item)
    return events


@settings(max_examples=60, deadline=None)
@given(EVENTS, st.sampled_from([Finish("stop"), Finish("length"), Finish("stop", "STOP"), Finish("stop", 7)]))
def test_any_event_stream_reassembles_with_the_sdk_to_the_whole_message(drawn, finish):
    events = core_events(drawn) + [finish]
    blocks = ContentBlocks()
    stream = [{"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": anthropic_usage(Usage(5, 0, 2))}}]
    for event in events:
        stream += blocks.add(event)
    stop_reason, stop_sequence = blocks.stop_reason()
    stream += [{"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": anthropic_usage(Usage(5, 3, 2))}, {"type": "message_stop"}]
    snapshot, buffers = None, {}
    for data in stream:
        event = STREAM_EVENT.validate_python(data)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=buffers)
    whole = Message.model_validate({"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                    "content": blocks.content(), "stop_reason": stop_reason,
                                    "stop_sequence": stop_sequence, "usage": anthropic_usage(Usage(5, 3, 2))})
    assert [b.to_dict() for b in snapshot.content] == [b.to_dict() for b in whole.content]
    kinds = [b.type for b in whole.content]
    assert all(a != b or a == "tool_use" for a, b in zip(kinds, kinds[1:]))  # a block per run of one kind
    expected = ("max_tokens" if finish.reason == "length" else "tool_use" if "call" in drawn
                else "stop_sequence" if finish.stop_reason == "STOP" else "end_turn")
    assert stop_reason == expected and (stop_sequence == "STOP") == (expected == "stop_sequence")


def test_usage_splits_prefix_cache_reads_from_the_rest():
    assert anthropic_usage(Usage(100, 7, cached_tokens=64, reasoning_tokens=3)) == {
        "input_tokens": 36, "output_tokens": 7, "cache_read_input_tokens": 64, "cache_creation_input_tokens": 0,
        "output_tokens_details": {"thinking_tokens": 3}}


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                          (404, "not_found_error"), (429, "rate_limit_error"),
                                          (500, "api_error"), (503, "overloaded_error")])
def test_stream_errors_are_anthropic_error_events(status, kind):
    (event,) = error_events(APIError(status, "bad \ud800 input"))
    parsed = ErrorResponse.model_validate(event)
    assert parsed.error.type == kind and parsed.error.message.startswith("bad ")


def test_thinking_and_tool_turns_render_on_harmony_channels():
    """gpt-oss: an earlier turn's thinking goes back on the analysis channel, its call on commentary."""
    pytest.importorskip("openai_harmony")
    from server.conversation.harmony import harmony_encoding, render_harmony

    conversation = conversation_of(request(tools=[TOOL], messages=[
        {"role": "user", "content": "Read a"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "I should read a.", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "hello"}]}]))
    prompt = harmony_encoding().decode(render_harmony(conversation))
    assert "<|channel|>analysis<|message|>I should read a." in prompt
    assert 'to=functions.read<|channel|>commentary <|constrain|>json<|message|>{"path": "a"}' in prompt
    assert "<|start|>functions.read to=assistant<|channel|>commentary<|message|>hello" in prompt
