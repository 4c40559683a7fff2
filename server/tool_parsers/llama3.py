"""Llama 3.1+ JSON calls: the completion is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`), several separated by `;`. Only a completion that starts with the call is a call."""

from __future__ import annotations

from server.tool_parsers.base import ParsedMessage, ToolParser, call_from_object, leading_json

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True  # <|python_tag|>

    def call_start(self, text: str) -> int | None:
        body = text.lstrip()
        if body.startswith("{") or body.startswith(PYTHON_TAG):
            return len(text) - len(body)
        return None

    def held_back(self, text: str) -> int:
        """Until the first non-space text shows whether this is a call, nothing is streamed."""
        body = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(body) else 0

    def parse(self, text: str) -> ParsedMessage:
        rest = text.lstrip()
        if rest.startswith(PYTHON_TAG):
            rest = rest[len(PYTHON_TAG):]
        calls = []
        while rest.strip():
            found = leading_json(rest)
            call = call_from_object(found[0], ("parameters", "arguments")) if found else None
            if found is None or call is None:
                return ParsedMessage(text)
            calls.append(call)
            rest = rest[found[1]:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:]
            elif rest.strip():
                return ParsedMessage(text)
        return ParsedMessage("", calls) if calls else ParsedMessage(text)
