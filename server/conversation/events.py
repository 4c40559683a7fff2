"""The one stream of parsed output events every protocol renders, and the whole message they add up to.

A protocol renders a streamed response event by event and a non-streamed one from `fold`
of the same events, so the two agree by construction (tests check the renderers keep it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.conversation.items import ToolKind


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call begins; its arguments follow as ToolCallArguments of the same `index` (0, 1, ... per choice)."""

    index: int
    call_id: str
    name: str
    kind: ToolKind = "function"  # custom: the arguments are the tool's raw input text, not JSON


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    fragment: str


FinishReason = Literal["stop", "length", "tool_calls", "abort"]


@dataclass(frozen=True)
class Finish:
    """The choice ended. "tool_calls": the model chose to call (a forced call keeps "stop", as OpenAI's chat).

    `stop_reason` is the stop string or token id that ended it (None for EOS or a length limit).
    """

    reason: FinishReason | str
    stop_reason: str | int | None = None


Event = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArguments | Finish


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    reasoning_tokens: int = 0  # completion tokens the model spent reasoning

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FoldedCall:
    call_id: str
    name: str
    kind: ToolKind
    arguments: str = ""


@dataclass
class FoldedMessage:
    """What a choice's events add up to."""

    text: str = ""
    reasoning: str | None = None
    tool_calls: list[FoldedCall] = field(default_factory=list)
    finish: Finish | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
        elif isinstance(event, ReasoningDelta):
            self.reasoning = (self.reasoning or "") + event.text
        elif isinstance(event, ToolCallStart):
            self.tool_calls.append(FoldedCall(event.call_id, event.name, event.kind))
        elif isinstance(event, ToolCallArguments):
            self.tool_calls[event.index].arguments += event.fragment
        elif isinstance(event, Finish):
            self.finish = event


def fold(events: list[Event]) -> FoldedMessage:
    message = FoldedMessage()
    for event in events:
        message.add(event)
    return message
