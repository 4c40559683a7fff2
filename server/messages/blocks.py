"""The core's events as Anthropic content blocks: stream events as they come, and the whole message's blocks.

One `ContentBlocks` turns every event into `content_block_start` / `_delta` / `_stop` events and
keeps the blocks those events build, so a non-streamed message (the blocks after all events) and
the reassembly of the stream agree by construction. Reasoning becomes `thinking` blocks (without
a signature: nothing here can sign them), text `text` blocks, tool calls `tool_use` blocks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from server.conversation import Event, Finish, ReasoningDelta, TextDelta, ToolCallArguments, ToolCallStart, Usage
from server.errors import APIError

logger = logging.getLogger("minerva.server")

StreamEvent = dict[str, Any]


@dataclass
class ContentBlocks:
    blocks: list[dict[str, Any]] = field(default_factory=list)
    open: int | None = None  # the block taking deltas
    calls: dict[int, int] = field(default_factory=dict)  # the core's call index -> block index
    arguments: dict[int, str] = field(default_factory=dict)  # tool_use block index -> its input's JSON so far
    finish: Finish | None = None

    def add(self, event: Event) -> list[StreamEvent]:
        if isinstance(event, TextDelta):
            return self._append("text", event.text)
        if isinstance(event, ReasoningDelta):
            return self._append("thinking", event.text)
        if isinstance(event, ToolCallStart):
            started = self._start({"type": "tool_use", "id": event.call_id, "name": event.name, "input": {}})
            assert self.open is not None
            self.calls[event.index], self.arguments[self.open] = self.open, ""
            return started
        if isinstance(event, ToolCallArguments):
            index = self.calls[event.index]
            self.arguments[index] += event.fragment
            return [{"type": "content_block_delta", "index": index,
                     "delta": {"type": "input_json_delta", "partial_json": event.fragment}}]
        self.finish = event
        return self.close()

    def close(self) -> list[StreamEvent]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [{"type": "content_block_stop", "index": index}]

    def content(self) -> list[dict[str, Any]]:
        """The blocks, each tool_use input parsed from the JSON its deltas carried."""
        return [{**block, "input": tool_input(self.arguments[index])} if block["type"] == "tool_use" else block
                for index, block in enumerate(self.blocks)]

    def stop_reason(self) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence): max_tokens, tool_use, stop_sequence (a stop string matched) or end_turn."""
        finish = self.finish
        if finish is not None and finish.reason == "abort":
            raise APIError(500, f"generation was aborted: {finish.stop_reason}", type="server_error")
        if finish is not None and finish.reason == "length":
            return "max_tokens", None
        if self.calls:
            return "tool_use", None
        if finish is not None and isinstance(finish.stop_reason, str):
            return "stop_sequence", finish.stop_reason
        return "end_turn", None

    def _append(self, kind: str, text: str) -> list[StreamEvent]:
        empty = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
        started = [] if self.open is not None and self.blocks[self.open]["type"] == kind else self._start(empty)
        assert self.open is not None
        self.blocks[self.open][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        return started + [{"type": "content_block_delta", "index": self.open, "delta": delta}]

    def _start(self, block: dict[str, Any]) -> list[StreamEvent]:
        closed = self.close()
        self.blocks.append(block)
        self.open = len(self.blocks) - 1
        return closed + [{"type": "content_block_start", "index": self.open, "content_block": dict(block)}]


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as the object Anthropic's `input` is; what is not an object is logged and left empty."""
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        logger.warning("tool call arguments are not a JSON object; sent as an empty input: %.200s", arguments)
        return {}
    return value


def anthropic_usage(usage: Usage) -> dict[str, Any]:
    """Prompt tokens split as Anthropic counts them: those read from the prefix cache apart from the rest."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0,
            "output_tokens_details": {"thinking_tokens": usage.reasoning_tokens}}
