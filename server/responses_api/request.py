"""POST /v1/responses request bodies as pydantic models: the fields Minerva honours, with their ranges.

Input items and tools stay plain dicts here: agents send item and tool types this server
has no use for (web search results, built-in tools), and those are skipped with a warning
in server/responses_api/translate.py rather than refused, so an agent is never stopped by a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from engine.sampling_params import FIELD_BOUNDS
from server.conversation.reasoning import Effort
from server.protocol import APIModel

ENCRYPTED_REASONING = "reasoning.encrypted_content"


class TextFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(APIModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(APIModel):
    effort: Effort | None = None  # every value of the spec; server/conversation/reasoning.py maps it
    summary: str | None = None


class ResponsesRequest(APIModel):
    """POST /v1/responses."""

    model: str | None = None  # None: the only (or first) served model
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, **FIELD_BOUNDS["max_tokens"])
    temperature: float | None = Field(None, **FIELD_BOUNDS["temperature"])
    top_p: float | None = Field(None, **FIELD_BOUNDS["top_p"])
    stream: bool = False
    store: bool = True
    include: list[str] | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @property
    def sampling_temperature(self) -> float:
        """OpenAI's default where the request leaves it out (also what the response echoes)."""
        return 1.0 if self.temperature is None else self.temperature

    @property
    def sampling_top_p(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    @property
    def wants_encrypted_reasoning(self) -> bool:
        return ENCRYPTED_REASONING in (self.include or [])
