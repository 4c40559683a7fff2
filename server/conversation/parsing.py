"""Reading a completion back: which parser splits it, the split itself, and its streamed events.

Streamed and non-streamed output come from the same `parse_completion`, so a stream's events
reassemble to exactly the whole completion's split.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.conversation.events import Event, TextDelta, ToolCallArguments, ToolCallStart
from server.conversation.items import Conversation
from server.tool_parsers import (NamedFunctionParser, ParsedMessage, RequiredToolsParser, ToolParser,
                                 detect_parser_name, parser_named)


def tool_parser_for(conversation: Conversation, chat_template: str | None, override: str | None) -> ToolParser | None:
    """None when the conversation has no tools in play; else the parser its output goes through."""
    mode = conversation.tool_mode
    if mode == "none":
        return None
    if mode == "named":
        return NamedFunctionParser(str(conversation.tool_choice))
    if mode == "required":
        return RequiredToolsParser()
    return parser_named(override or detect_parser_name(chat_template))


def parse_completion(parser: ToolParser, text: str, parallel: bool) -> ParsedMessage:
    """The parser's split, with at most one call when parallel_tool_calls is false and content trimmed before calls."""
    parsed = parser.parse(text)
    if not parallel:
        parsed.tool_calls = parsed.tool_calls[:1]
    if parsed.tool_calls:
        parsed.content = parsed.content.rstrip()
    return parsed


def finish_reason(parser: ToolParser, parsed: ParsedMessage, engine_reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call; a named tool_choice keeps "stop"."""
    if parsed.tool_calls and engine_reason == "stop" and not isinstance(parser, NamedFunctionParser):
        return "tool_calls"
    return engine_reason


def call_events(parsed: ParsedMessage, first_index: int = 0) -> list[Event]:
    """Each parsed call as a start and (when it has any) one arguments fragment."""
    events: list[Event] = []
    for index, call in enumerate(parsed.tool_calls, first_index):
        events.append(ToolCallStart(index, call.id, call.name))
        if call.arguments:
            events.append(ToolCallArguments(index, call.arguments))
    return events


@dataclass
class ToolCallStream:
    """One choice's streamed events: text before a call at once, calls when the completion ends.

    A named function's arguments stream as they are generated (the whole completion is them).
    """

    parser: ToolParser
    parallel: bool
    text: str = ""
    sent: str = ""  # content already streamed
    calls_started: bool = False
    named_id: str | None = None
    reasoning_tokens: int = 0  # these formats carry no reasoning

    def feed(self, delta: str) -> list[Event]:
        self.text += delta
        if isinstance(self.parser, NamedFunctionParser):
            return self._named(delta)
        if self.calls_started:
            return []
        start = self.parser.call_start(self.text)
        self.calls_started = start is not None
        end = start if start is not None else len(self.text) - self.parser.held_back(self.text)
        safe = self.text[:end]
        safe = safe[:len(safe.rstrip())]  # trailing whitespace waits: it is dropped if a call follows
        return self._content(safe)

    def finish(self) -> tuple[list[Event], ParsedMessage]:
        """The remaining events and the final parse (its finish reason is the caller's)."""
        parsed = parse_completion(self.parser, self.text, self.parallel)
        if isinstance(self.parser, NamedFunctionParser):
            return self._named(""), parsed
        events = self._content(parsed.content) if parsed.content.startswith(self.sent) else []
        return events + call_events(parsed), parsed

    def _content(self, upto: str) -> list[Event]:
        if len(upto) <= len(self.sent):
            return []
        new, self.sent = upto[len(self.sent):], upto
        return [TextDelta(new)]

    def _named(self, delta: str) -> list[Event]:
        assert isinstance(self.parser, NamedFunctionParser)
        events: list[Event] = []
        if self.named_id is None:
            call = self.parser.parse("").tool_calls[0]
            self.named_id = call.id
            events.append(ToolCallStart(0, call.id, call.name))
        if delta:
            events.append(ToolCallArguments(0, delta))
        return events
