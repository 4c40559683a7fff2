"""Completions a grammar forced into tool-call JSON (tool_choice "required" or a named function).

These do not depend on the model family: the grammar, not the chat template, decides the shape.
"""

from __future__ import annotations

import json

from server.tool_parsers.base import ParsedMessage, ToolCall, ToolParser


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
    """The completion is the grammar's JSON list of `{"name", "parameters"}`; none of it is ever content.

    Cut by a limit, every call whose name was written is kept, its arguments as generated (OpenAI's
    forced calls at finish "length" carry the partial arguments too).
    """

    name = "required"

    def parse(self, text: str) -> ParsedMessage:
        return ParsedMessage("", [ToolCall(name, arguments) for name, arguments in listed_calls(text)])

    def call_start(self, text: str) -> int | None:
        return 0


def _skip(text: str, pos: int, characters: str = " \t\n\r") -> int:
    while pos < len(text) and text[pos] in characters:
        pos += 1
    return pos


def listed_calls(text: str) -> list[tuple[str, str]]:
    """(name, arguments text) of each call in `[{"name": ..., "parameters": {...}}, ...]`, however far it got."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, str]] = []
    pos = _skip(text, 0)
    if not text.startswith("[", pos):
        return calls
    pos += 1
    while text.startswith("{", pos := _skip(text, pos, " \t\n\r,")):
        pos, name, arguments, complete = _call_object(decoder, text, pos + 1)
        if name is not None:
            calls.append((name, arguments))
        if not complete:
            break
    return calls


def _call_object(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[int, str | None, str, bool]:
    """One call object's members from after its `{`: (end, name, arguments text, whether it closed)."""
    name, arguments = None, ""
    while True:
        pos = _skip(text, pos, " \t\n\r,")
        if text.startswith("}", pos):
            return pos + 1, name, arguments, True
        try:
            key, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return pos, name, arguments, False
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            return pos, name, arguments, False
        pos = _skip(text, pos + 1)
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            if key == "parameters":
                arguments = text[pos:].rstrip()
            return pos, name, arguments, False
        if key == "name" and isinstance(value, str):
            name = value
        elif key == "parameters":
            arguments = text[pos:end]
        pos = end
