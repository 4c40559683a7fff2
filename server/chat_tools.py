"""Tool calls in chat completions: which parser reads a request's output, the final message, streamed deltas.

Streamed and non-streamed responses come from the same `parse_completion`, so a streamed
response's deltas reassemble to exactly the non-streamed message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.tool_parsers import (NamedFunctionParser, ParsedMessage, RequiredToolsParser, ToolParser,
                                 detect_parser_name, parser_named)


def tool_parser_for(body: ChatCompletionRequest, chat_template: str | None, override: str | None) -> ToolParser | None:
    """None when the request has no tools in play; else the parser its output goes through."""
    mode = body.tool_mode
    if mode == "none":
        return None
    if mode == "named":
        assert isinstance(body.tool_choice, NamedToolChoice)
        return NamedFunctionParser(body.tool_choice.function.name)
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


def assistant_message(parsed: ParsedMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None, "refusal": None}
    if not parsed.tool_calls and not parsed.content:
        message["content"] = parsed.content  # plain empty text stays "" as before tools existed
    if parsed.reasoning_content is not None:
        message["reasoning_content"] = parsed.reasoning_content
    if parsed.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
    return message


def tool_call_deltas(index: int, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
    """OpenAI's streamed shape: the call's id, type and name first (arguments ""), then argument fragments."""
    head = {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}
    return [head] + ([{"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}] if arguments else [])


@dataclass
class ToolCallStream:
    """One choice's streamed deltas: text before a call as content at once, calls when the completion ends.

    A named function's arguments stream as they are generated (the whole completion is them).
    """

    parser: ToolParser
    parallel: bool
    text: str = ""
    sent: str = ""  # content already streamed
    calls_started: bool = False
    named_id: str | None = None

    def feed(self, delta: str) -> list[dict[str, Any]]:
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

    def finish(self) -> tuple[list[dict[str, Any]], ParsedMessage]:
        """The remaining deltas and the final parse (its finish reason is the caller's)."""
        parsed = parse_completion(self.parser, self.text, self.parallel)
        if isinstance(self.parser, NamedFunctionParser):
            return self._named(""), parsed
        deltas = self._content(parsed.content) if parsed.content.startswith(self.sent) else []
        for index, call in enumerate(parsed.tool_calls):
            deltas += tool_call_deltas(index, call.id, call.name, call.arguments)
        return deltas, parsed

    def _content(self, upto: str) -> list[dict[str, Any]]:
        if len(upto) <= len(self.sent):
            return []
        new, self.sent = upto[len(self.sent):], upto
        return [{"content": new}]

    def _named(self, delta: str) -> list[dict[str, Any]]:
        assert isinstance(self.parser, NamedFunctionParser)
        if self.named_id is None:
            call = self.parser.parse("").tool_calls[0]
            self.named_id = call.id
            return tool_call_deltas(0, call.id, call.name, delta)
        return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}] if delta else []
