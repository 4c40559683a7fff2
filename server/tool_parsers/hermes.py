"""Hermes-style calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/3, SmolLM2/3, Hermes).

SmolLM2 writes a JSON list inside one tag; both shapes are read.
"""

from __future__ import annotations

import re

from server.tool_parsers.base import MarkerParser, ParsedMessage, calls_from_json

BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


class HermesParser(MarkerParser):
    name = "hermes"
    start_marker = "<tool_call>"

    def parse(self, text: str) -> ParsedMessage:
        calls, content, position = [], [], 0
        for match in BLOCK.finditer(text):
            found = calls_from_json(match.group(1).strip())
            if found is None:  # malformed or truncated: it stays text
                continue
            content.append(text[position:match.start()])
            calls.extend(found)
            position = match.end()
        content.append(text[position:])
        return ParsedMessage("".join(content), calls)
