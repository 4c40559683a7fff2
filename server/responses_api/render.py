"""The core's output events -> Responses stream events, numbered in order, and the Response object they build.

Non-streamed responses run the same renderer over the whole completion's events and return its
final object, so the body a client gets equals what the streamed events reassemble to.
Each output item opens (`output_item.added`), grows by deltas and closes (`.done` events, then
`output_item.done`); a reasoning item, a message, and each call are separate items, in the order
the model wrote them.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.conversation import Event, Finish, ReasoningDelta, TextDelta, Tool, ToolCallArguments, ToolCallStart, Usage
from server.errors import APIError
from server.responses_api.items import new_item_id
from server.responses_api.sealing import ReasoningSeal

StreamEvent = dict[str, Any]


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def tool_echo(tool: Tool) -> dict[str, Any]:
    """A served tool as the response lists it (OpenAI's FunctionTool / CustomTool)."""
    if tool.kind == "custom":
        spec = ({"type": "grammar", "syntax": tool.grammar.syntax, "definition": tool.grammar.definition}
                if tool.grammar is not None else {"type": "text"})
        return {"type": "custom", "name": tool.name, "description": tool.description or None, "format": spec}
    return {"type": "function", "name": tool.name, "description": tool.description or None,
            "parameters": tool.parameters, "strict": None}


def usage_of(usage: Usage) -> dict[str, Any]:
    # cache_write_tokens: Minerva has no separately billed cache writes (its prefix cache fills as it serves)
    return {"input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.total_tokens}


@dataclass
class ResponseRenderer:
    """`head`: the response's fixed fields (id, model, echoed request settings). `seal`: set when the client
    asked for reasoning.encrypted_content, which then goes out on every reasoning item. `namespaces`: tool
    name -> the namespace tool it came from, named on its calls."""

    head: dict[str, Any]
    seal: ReasoningSeal | None = None
    namespaces: dict[str, str] = field(default_factory=dict)
    output: list[dict[str, Any]] = field(default_factory=list)
    sequence: int = 0
    started: bool = False
    open: dict[str, Any] | None = None  # the item being streamed (also the last of `output`)
    finish: Finish | None = None
    final: dict[str, Any] | None = None  # the finished (completed, incomplete or failed) response

    def events(self, events: list[Event]) -> list[StreamEvent]:
        out = self._start()
        for event in events:
            if isinstance(event, ReasoningDelta):
                out += self._grow("reasoning", event.text)
            elif isinstance(event, TextDelta):
                out += self._grow("message", event.text)
            elif isinstance(event, ToolCallStart):
                out += self._close() + self._open(self._call_item(event))
            elif isinstance(event, ToolCallArguments):
                out += self._call_delta(event.fragment)
            elif isinstance(event, Finish):
                self.finish = event
                out += self._close("incomplete" if event.reason == "length" else "completed")
        return out

    def complete(self, usage: Usage) -> list[StreamEvent]:
        """The closing event: response.completed, or response.incomplete when the output limit cut it short."""
        out = self._start() + self._close()
        incomplete = self.finish is not None and self.finish.reason == "length"
        self.final = self.response("incomplete" if incomplete else "completed", usage=usage_of(usage),
                                   incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
                                   completed_at=None if incomplete else int(time.time()))
        return out + [self._emit("response.incomplete" if incomplete else "response.completed", response=self.final)]

    def fail(self, error: APIError) -> list[StreamEvent]:
        """An error mid-stream: the `error` event, then response.failed carrying it."""
        out = self._start()
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.final = self.response("failed", error={"code": code, "message": error.message})
        return out + [self._emit("error", code=error.code or error.type, message=error.message, param=error.param),
                      self._emit("response.failed", response=self.final)]

    def response(self, status: str, **fields: Any) -> dict[str, Any]:
        body = {**self.head, "status": status, "output": copy.deepcopy(self.output), "usage": None,
                "error": None, "incomplete_details": None}
        body.update(fields)
        return body

    # --- items ------------------------------------------------------------------------------------------

    def _start(self) -> list[StreamEvent]:
        if self.started:
            return []
        self.started = True
        response = self.response("in_progress")
        return [self._emit("response.created", response=response),
                self._emit("response.in_progress", response=response)]

    def _emit(self, kind: str, **fields: Any) -> StreamEvent:
        """The next event; a snapshot (items keep growing after it is emitted)."""
        event = {"type": kind, "sequence_number": self.sequence, **copy.deepcopy(fields)}
        self.sequence += 1
        return event

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.output) - 1}

    def _open(self, item: dict[str, Any]) -> list[StreamEvent]:
        self.open = item
        self.output.append(item)
        out = [self._emit("response.output_item.added", output_index=len(self.output) - 1, item=item)]
        part = {"message": {"type": "output_text", "text": "", "annotations": []},
                "reasoning": {"type": "reasoning_text", "text": ""}}.get(item["type"])
        if part is not None:
            item["content"] = [part]
            out.append(self._emit("response.content_part.added", **self._where(), content_index=0, part=part))
        return out

    def _grow(self, kind: str, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self.open is None or self.open["type"] != kind:
            item = ({"id": new_item_id("message"), "type": "message", "role": "assistant", "status": "in_progress",
                     "content": []} if kind == "message" else
                    {"id": new_item_id("reasoning"), "type": "reasoning", "summary": [], "content": [],
                     "status": "in_progress"})
            out = self._close() + self._open(item)
        assert self.open is not None
        self.open["content"][0]["text"] += text
        if kind == "message":
            return out + [self._emit("response.output_text.delta", **self._where(), content_index=0, delta=text,
                                     logprobs=[])]
        return out + [self._emit("response.reasoning_text.delta", **self._where(), content_index=0, delta=text)]

    def _call_item(self, start: ToolCallStart) -> dict[str, Any]:
        if start.kind == "custom":
            item = {"id": new_item_id("custom_tool_call"), "type": "custom_tool_call", "call_id": start.call_id,
                    "name": start.name, "input": "", "status": "in_progress"}
        else:
            item = {"id": new_item_id("function_call"), "type": "function_call", "call_id": start.call_id,
                    "name": start.name, "arguments": "", "status": "in_progress"}
        if start.name in self.namespaces:
            item["namespace"] = self.namespaces[start.name]
        return item

    def _call_delta(self, fragment: str) -> list[StreamEvent]:
        assert self.open is not None and self.open["type"] in ("function_call", "custom_tool_call")
        if self.open["type"] == "custom_tool_call":
            self.open["input"] += fragment
            return [self._emit("response.custom_tool_call_input.delta", **self._where(), delta=fragment)]
        self.open["arguments"] += fragment
        return [self._emit("response.function_call_arguments.delta", **self._where(), delta=fragment)]

    def _close(self, status: str = "completed") -> list[StreamEvent]:
        item = self.open
        if item is None:
            return []
        where = self._where()
        out: list[StreamEvent] = []
        kind = item["type"]
        if kind in ("message", "reasoning"):
            part = item["content"][0]
            if kind == "message":
                out.append(self._emit("response.output_text.done", **where, content_index=0, text=part["text"],
                                      logprobs=[]))
            else:
                out.append(self._emit("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
                if self.seal is not None:
                    item["encrypted_content"] = self.seal.seal(part["text"])
            out.append(self._emit("response.content_part.done", **where, content_index=0, part=part))
        elif kind == "function_call":
            out.append(self._emit("response.function_call_arguments.done", **where, arguments=item["arguments"]))
        else:
            out.append(self._emit("response.custom_tool_call_input.done", **where, input=item["input"]))
        item["status"] = status
        self.open = None
        return out + [self._emit("response.output_item.done", output_index=where["output_index"], item=item)]
