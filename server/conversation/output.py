"""Engine outputs -> the core's events: one ChoiceStream per choice, one OutputEvents per request.

Non-streamed responses run the same code over the collected whole completion (one delta),
so both paths produce the same events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.outputs import RequestOutput, TokenLogprob
from server.choices import ChoiceTracker, Collected
from server.conversation.events import Event, Finish, TextDelta, ToolCallArguments, ToolCallStart, Usage
from server.conversation.harmony import HarmonyParser, HarmonyStream
from server.conversation.items import CUSTOM_INPUT, Conversation
from server.conversation.parsing import ToolCallStream, finish_reason
from server.tool_parsers import NamedFunctionParser, ToolParser


@dataclass
class ChoiceStream:
    """One choice's text deltas -> events, ending with Finish.

    Calls to custom tools come out with kind "custom" and their raw input as the arguments
    (the model wrote `{"input": ...}`; a forced custom call's whole output is the input).
    """

    parser: ToolParser | None
    conversation: Conversation
    tools: ToolCallStream | HarmonyStream | None = None
    custom_calls: set[int] = field(default_factory=set)  # indices of calls to custom tools
    finished: bool = False

    def __post_init__(self) -> None:
        parallel = self.conversation.parallel_tool_calls
        if isinstance(self.parser, HarmonyParser):
            self.tools = HarmonyStream(self.parser, parallel)
        elif self.parser is not None:
            self.tools = ToolCallStream(self.parser, parallel)

    @property
    def reasoning_tokens(self) -> int:
        return self.tools.reasoning_tokens if self.tools is not None else 0

    def feed(self, text: str) -> list[Event]:
        if self.tools is None:
            return [TextDelta(text)] if text else []
        return self._kinds(self.tools.feed(text))

    def finish(self, engine_reason: str, stop_reason: str | int | None = None) -> list[Event]:
        self.finished = True
        if self.tools is None:
            return [Finish(engine_reason, stop_reason)]
        events, parsed = self.tools.finish()
        assert self.parser is not None
        reason = finish_reason(self.parser, parsed, engine_reason) or engine_reason
        return self._kinds(events) + [Finish(reason, stop_reason)]

    def _kinds(self, events: list[Event]) -> list[Event]:
        named_raw = isinstance(self.parser, NamedFunctionParser)
        out: list[Event] = []
        for event in events:
            if isinstance(event, ToolCallStart):
                tool = self.conversation.tool(event.name)
                if tool is not None and tool.kind == "custom":
                    self.custom_calls.add(event.index)
                    event = ToolCallStart(event.index, event.call_id, event.name, "custom")
            elif isinstance(event, ToolCallArguments) and event.index in self.custom_calls and not named_raw:
                event = ToolCallArguments(event.index, custom_input(event.fragment))
            out.append(event)
        return out


def custom_input(arguments: str) -> str:
    """`{"input": "..."}` -> the input text; anything else the model wrote stays as written."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(text := value.get(CUSTOM_INPUT), str):
        return text
    return arguments


@dataclass
class ChoiceEvents:
    """What one engine output adds to one choice: its events and the logprobs of the tokens behind them."""

    choice: int
    events: list[Event]
    logprobs: list[TokenLogprob]
    first: bool  # the first events of this choice


class OutputEvents:
    """A request's engine outputs (deltas, one prompt per prompt index, `n` samples each) -> events per choice."""

    def __init__(self, conversation: Conversation, parser: ToolParser | None, n: int = 1) -> None:
        self.conversation, self.parser = conversation, parser
        self.tracker = ChoiceTracker(n)
        self.choices: dict[int, ChoiceStream] = {}
        self.cached_tokens: dict[int, int] = {}

    def step(self, prompt_index: int, output: RequestOutput) -> list[ChoiceEvents]:
        self.cached_tokens[prompt_index] = output.num_cached_tokens
        found = []
        for delta in self.tracker.deltas(prompt_index, output):
            stream = self.choices.setdefault(delta.index, ChoiceStream(self.parser, self.conversation))
            events = stream.feed(delta.text)
            if delta.finish_reason:
                stop = next((s.stop_reason for s in output.outputs
                             if self.tracker.choice_index(prompt_index, s) == delta.index), None)
                events += stream.finish(delta.finish_reason, stop)
            found.append(ChoiceEvents(delta.index, events, delta.logprobs, delta.first))
        return found

    def whole(self, collected: Collected) -> dict[int, list[Event]]:
        """A non-streamed request's events per choice, from its collected whole completions."""
        events: dict[int, list[Event]] = {}
        for prompt_index, merged in sorted(collected.requests.items()):
            for item in self.step(prompt_index, merged.result("")):
                events.setdefault(item.choice, []).extend(item.events)
        return events

    def usage(self) -> Usage:
        counts = self.tracker.usage()
        return Usage(counts["prompt_tokens"], counts["completion_tokens"], sum(self.cached_tokens.values()),
                     sum(stream.reasoning_tokens for stream in self.choices.values()))
