"""Completions a grammar forced into tool-call JSON (tool_choice "required" or a named function).

These do not depend on the model family: the grammar, not the chat template, decides the shape.
"""

from __future__ import annotations

from server.tool_parsers.base import ParsedMessage, ToolCall, ToolParser, calls_from_json


class NamedFunctionParser(ToolParser):
    """The whole completion is the arguments object of the named function; it streams as it is generated."""

    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def parse(self, text: str) -> ParsedMessage:
        return ParsedMessage("", [ToolCall(self.function, text)])

    def call_start(self, text: str) -> int | None:
        return 0


class RequiredToolsParser(ToolParser):
    """The completion is a JSON list of `{"name", "parameters"}`; a truncated list stays content."""

    name = "required"

    def parse(self, text: str) -> ParsedMessage:
        calls = calls_from_json(text, ("parameters",))
        return ParsedMessage("", calls) if calls else ParsedMessage(text)

    def call_start(self, text: str) -> int | None:
        return 0
