"""Property: any stream of core events renders to a protocol stream that the official SDK's types accept
and whose reassembly equals the non-streamed object rendered from the same events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from responses_testing import check_stream, valid_response, without_ids
from server.conversation import Finish, ReasoningDelta, TextDelta, ToolCallArguments, ToolCallStart, Usage
from server.errors import APIError
from server.responses_api.render import ResponseRenderer
from server.responses_api.sealing import ReasoningSeal

HEAD = {"id": "resp_1", "object": "response", "created_at": 0, "model": "m", "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": []}
TEXT = st.text(min_size=1, max_size=6)


@st.composite
def core_events(draw):
    """Text and reasoning deltas in any order, then calls (each a start and argument fragments), then Finish."""
    events = draw(st.lists(st.one_of(TEXT.map(TextDelta), TEXT.map(ReasoningDelta)), max_size=8))
    for index in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["function", "custom"]))
        events.append(ToolCallStart(index, f"call_{index}", f"tool{index}", kind))
        events += [ToolCallArguments(index, fragment) for fragment in draw(st.lists(TEXT, max_size=3))]
    events.append(Finish(draw(st.sampled_from(["stop", "length", "tool_calls"]))))
    return events


def split(events: list, cuts: list[int]) -> list[list]:
    """The events as the engine might deliver them: in steps of any size."""
    steps, start = [], 0
    for cut in sorted(set(cut % (len(events) + 1) for cut in cuts)) + [len(events)]:
        steps.append(events[start:cut])
        start = cut
    return steps


USAGE = Usage(10, 5, cached_tokens=4, reasoning_tokens=2)


@settings(max_examples=150, deadline=None)
@given(core_events(), st.lists(st.integers(0, 40), max_size=6), st.booleans())
def test_responses_stream_reassembles_to_the_non_streamed_response(events, cuts, sealed):
    seal = ReasoningSeal.from_environment() if sealed else None
    streamed = ResponseRenderer(dict(HEAD), seal)
    stream = [e for step in split(events, cuts) for e in streamed.events(step)] + streamed.complete(USAGE)
    final = check_stream(stream)

    whole = ResponseRenderer(dict(HEAD), seal)
    whole.events(events)
    whole.complete(USAGE)
    assert whole.final is not None and valid_response(whole.final)
    assert without_ids(whole.final["output"]) == without_ids(final["output"])
    assert final["status"] == ("incomplete" if events[-1].reason == "length" else "completed")
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 2
    reasoning = [item for item in final["output"] if item["type"] == "reasoning"]
    assert all(seal.open(item["encrypted_content"]) == item["content"][0]["text"] for item in reasoning) if seal \
        else all("encrypted_content" not in item for item in reasoning)


@settings(max_examples=50, deadline=None)
@given(core_events())
def test_an_error_mid_stream_ends_it_with_error_and_response_failed(events):
    renderer = ResponseRenderer(dict(HEAD))
    stream = renderer.events(events[:-1]) + renderer.fail(APIError(503, "engine gone", code="engine_unavailable"))
    final = check_stream(stream)
    assert [e["type"] for e in stream[-2:]] == ["error", "response.failed"]
    assert final["status"] == "failed" and final["error"]["message"] == "engine gone"
