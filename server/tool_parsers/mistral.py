"""Mistral calls after the `[TOOL_CALLS]` token: a JSON list `[{"name", "arguments"}]` (v3 templates)
or `name[ARGS]{...}` repeated (v11+ templates)."""

from __future__ import annotations

import json

from server.tool_parsers.base import MarkerParser, ParsedMessage, ToolCall, calls_from_json, leading_json

ARGS = "[ARGS]"


class MistralParser(MarkerParser):
    name = "mistral"
    start_marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def parse(self, text: str) -> ParsedMessage:
        start = self.call_start(text)
        if start is None:
            return ParsedMessage(text)
        calls: list[ToolCall] = []
        for part in text[start:].split(self.start_marker)[1:]:
            found = calls_from_json(part.strip()) if ARGS not in part else _named_args_calls(part)
            if found is None:
                return ParsedMessage(text)
            calls.extend(found)
        return ParsedMessage(text[:start], calls)


def _named_args_calls(part: str) -> list[ToolCall] | None:
    """`name[ARGS]{...}` once or more."""
    calls, rest = [], part
    while rest.strip():
        name, sep, rest = rest.partition(ARGS)
        found = leading_json(rest) if sep else None
        if not name.strip() or found is None or not isinstance(found[0], dict):
            return None
        calls.append(ToolCall(name.strip(), json.dumps(found[0], ensure_ascii=False)))
        rest = rest[found[1]:]
    return calls
