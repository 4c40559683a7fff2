"""Anthropic Messages request bodies as pydantic models: the fields Minerva honours and their ranges.

Unknown fields are ignored (clients send newer ones, e.g. `cache_control`, `context_management`);
content block and tool shapes are read in `server.messages.convert`, which names the field of
anything it cannot use.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import FIELD_BOUNDS


class AnthropicModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputMessage(AnthropicModel):
    """A turn; "system" mid-conversation is how Claude Code sends late instructions (its environment block)."""

    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]


class ToolChoice(AnthropicModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool to call
    disable_parallel_tool_use: bool = False


class Thinking(AnthropicModel):
    """Extended thinking: "enabled" with a token budget maps to a reasoning effort; "adaptive" leaves the model's."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1)


class OutputFormat(AnthropicModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicModel):
    """`effort` is the reasoning effort (server/conversation/reasoning.py maps it); `format` constrains the text."""

    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(AnthropicModel):
    user_id: str | None = None


class CountTokensRequest(AnthropicModel):
    """POST /v1/messages/count_tokens: what the prompt of a Messages request would be."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages."""

    max_tokens: int = Field(**FIELD_BOUNDS["max_tokens"])
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, **FIELD_BOUNDS["temperature"])
    top_p: float | None = Field(None, **FIELD_BOUNDS["top_p"])
    top_k: int | None = Field(None, **FIELD_BOUNDS["top_k"])
    metadata: Metadata | None = None
