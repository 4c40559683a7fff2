"""gpt-oss harmony through the official openai-harmony package: completions it renders parse back into
reasoning, calls and content; prompts carry tools, reasoning effort and earlier calls and results."""

from __future__ import annotations

import json

import pytest

oh = pytest.importorskip("openai_harmony")

from server.chat import conversation_of  # noqa: E402
from server.conversation import ReasoningDelta, TextDelta  # noqa: E402
from server.conversation.harmony import (HarmonyParser, HarmonyStream, constrained_header,  # noqa: E402
                                         harmony_encoding, render_harmony)
from server.conversation.parsing import parse_completion  # noqa: E402
from server.protocol import ChatCompletionRequest, NamedToolChoice, ResponseFormat  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def completion_text(*messages) -> str:
    """What a gpt-oss model writes after `<|start|>assistant`, rendered by openai-harmony itself."""
    encoding = harmony_encoding()
    tokens = [t for m in messages for t in encoding.render(m)]
    head = encoding.encode("<|start|>assistant", allowed_special="all")
    assert tokens[:len(head)] == head
    text = encoding.decode(tokens[len(head):])
    for stop in ("<|call|>", "<|return|>"):  # the stop token ends generation and is not in the text
        text = text.removesuffix(stop)
    return text


def assistant(text: str, channel: str):
    return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)


def test_round_trip_reasoning_and_call():
    call = (assistant('{"city":"Paris"}', "commentary").with_recipient("functions.get_weather")
            .with_content_type("<|constrain|>json"))
    text = completion_text(assistant("User wants weather. Call the tool.", "analysis"), call)
    parsed = HarmonyParser().parse(text)
    assert parsed.reasoning_content == "User wants weather. Call the tool."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.content == ""


def test_round_trip_final_answer_and_streaming_equal():
    text = completion_text(assistant("Short thought.", "analysis"), assistant("It is sunny in Paris.", "final"))
    parser = HarmonyParser()
    parsed = parse_completion(parser, text, parallel=True)
    assert (parsed.reasoning_content, parsed.content, parsed.tool_calls) == ("Short thought.",
                                                                             "It is sunny in Paris.", [])
    tokens = harmony_encoding().encode(text, allowed_special="all")
    for size in (1, 3, 7, 1000):  # the engine's deltas are the text of whole tokens
        stream = HarmonyStream(parser, True)
        pieces = [harmony_encoding().decode(tokens[i:i + size]) for i in range(0, len(tokens), size)]
        deltas = [d for piece in pieces for d in stream.feed(piece)]
        deltas += stream.finish()[0]
        assert "".join(d.text for d in deltas if isinstance(d, ReasoningDelta)) == "Short thought."
        assert "".join(d.text for d in deltas if isinstance(d, TextDelta)) == "It is sunny in Paris."


@pytest.mark.parametrize("text", [
    "plain words without any harmony markup",
    "<|channel|>analysis<|message|>cut off mid-thou",
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Par',
])
def test_malformed_or_truncated_never_raises(text):
    parsed = HarmonyParser().parse(text)
    kept = (parsed.content or "") + (parsed.reasoning_content or "") + "".join(c.arguments for c in parsed.tool_calls)
    assert kept  # nothing is lost silently
    if text.startswith("<|channel|>commentary"):
        assert parsed.tool_calls[0].name == "get_weather" and parsed.tool_calls[0].arguments == '{"city": "Par'


def test_prompt_carries_effort_instructions_tools_and_earlier_turns():
    body = ChatCompletionRequest(reasoning_effort="high", tools=[WEATHER], messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    prompt = harmony_encoding().decode(render_harmony(conversation_of(body)))
    assert "Reasoning: high" in prompt
    assert "# Instructions\n\nAnswer briefly." in prompt and "type get_weather" in prompt
    assert ('<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
            '{"city":"Paris"}<|call|>') in prompt
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in prompt
    assert prompt.endswith("<|start|>assistant")
    assert harmony_encoding().decode(constrained_header(conversation_of(body))) == ""
    named = body.model_copy(update={"tool_choice": NamedToolChoice(type="function", function={"name": "get_weather"})})
    assert (harmony_encoding().decode(constrained_header(conversation_of(named)))
            == "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")
    json_format = body.model_copy(update={"response_format": ResponseFormat(type="json_object")})
    assert harmony_encoding().decode(constrained_header(conversation_of(json_format))) == "<|channel|>final<|message|>"
