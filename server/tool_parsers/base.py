"""What every tool-call parser returns, and the shared pieces: call ids, JSON call objects, marker search."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedMessage:
    """A completion split into what the client sees: text, reasoning and calls (text outside calls stays content)."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_content: str | None = None


class ToolParser:
    """One model family's tool-call format.

    `parse` splits a whole completion; text that looks like a call but does not parse stays
    content. Streaming uses `call_start` (where calls begin, once known) and `held_back`
    (how much of the tail might still become a marker) to stream the text before a call.
    """

    name = ""
    needs_special_tokens = False  # the markers are special tokens: decode must keep them

    def parse(self, text: str) -> ParsedMessage:
        raise NotImplementedError

    def call_start(self, text: str) -> int | None:
        raise NotImplementedError

    def held_back(self, text: str) -> int:
        return 0


class MarkerParser(ToolParser):
    """Formats whose calls begin with a fixed marker string (`<tool_call>`, `[TOOL_CALLS]`, ...)."""

    start_marker = ""

    def call_start(self, text: str) -> int | None:
        index = text.find(self.start_marker)
        return None if index < 0 else index

    def held_back(self, text: str) -> int:
        """The longest tail of `text` that is a proper prefix of the marker."""
        for size in range(min(len(self.start_marker) - 1, len(text)), 0, -1):
            if self.start_marker.startswith(text[-size:]):
                return size
        return 0


def call_from_object(obj: Any, arguments_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """{"name": ..., "arguments"|"parameters": {...}} as a ToolCall; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments: object = next((obj[key] for key in arguments_keys if key in obj), {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def calls_from_json(text: str) -> list[ToolCall] | None:
    """One call object or a list of them; None unless the whole text is that."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call for item in items if (call := call_from_object(item)) is not None]
    if not calls or len(calls) != len(items):  # some item is no call
        return None
    return calls


def leading_json(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of `text` (after whitespace) and where it ends; None if there is none."""
    stripped = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, stripped)
    except json.JSONDecodeError:
        return None
    return value, end
