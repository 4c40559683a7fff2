"""The one internal conversation every protocol (chat completions, Responses, Messages) translates into.

A protocol module fills these from its request shape and names, in `param`, where each piece
came from, so errors found later (bad call arguments, a schema the grammar engine refuses)
still name the client's field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema

from engine.structured.spec import StructuredOutput
from server.conversation.reasoning import Effort
from server.errors import APIError

Role = Literal["system", "developer", "user", "assistant", "tool"]
ToolKind = Literal["function", "custom"]
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
CUSTOM_INPUT = "input"  # a free-form (custom) tool is shown to the model as a function of one string


@dataclass
class Grammar:
    """A custom tool's input grammar, as OpenAI's `format: {type: grammar, syntax, definition}`."""

    syntax: Literal["lark", "regex"]
    definition: str


@dataclass
class Tool:
    """A tool the model may call: a JSON-schema function, or a custom tool taking free text."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # functions only; None: no arguments
    kind: ToolKind = "function"
    grammar: Grammar | None = None  # custom tools only
    param: str = "tools"  # the request field it came from

    def __post_init__(self) -> None:
        if self.parameters is not None:
            check_json_schema(self.parameters, f"{self.param}.parameters")

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON schema of its arguments; a custom tool's is `{"input": string}` (templates know only functions)."""
        if self.kind == "custom":
            return {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string"}}, "required": [CUSTOM_INPUT]}
        return self.parameters or NO_ARGUMENTS


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming `param` unless `schema` is valid under its metaschema (2020-12 unless `$schema` says
    otherwise): a broken tool schema would otherwise be accepted with tool_choice auto and never enforced."""
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = exc.json_path.removeprefix("$")
        raise APIError(400, f"{param}{where}: not a valid JSON Schema: {exc.message}", param=param,
                       code="invalid_schema") from exc


def repeated_tool_name(names: Iterable[str]) -> str | None:
    """A name offered twice, if any: a named tool_choice and each parsed call find their tool by name alone."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def unoffered_tool(name: str | None, offered: Sequence[str]) -> str | None:
    """Why a named tool_choice cannot be met (`"'x', which is not among the tools (a, b)"`), None when it can."""
    if name is not None and name in offered:
        return None
    return f"{name!r}, which is not among the tools ({', '.join(offered) or 'none'})"


@dataclass
class ToolCallItem:
    """A call the assistant made earlier; `arguments` is JSON text for functions, the raw input for custom tools."""

    call_id: str
    name: str
    arguments: str
    kind: ToolKind = "function"
    param: str = "messages"

    def arguments_object(self) -> dict[str, Any] | str:
        """The arguments as templates take them: an object (`| tojson`), or the text as it is when it is not
        a JSON object (a call cut by max_tokens is replayed as the model wrote it)."""
        if self.kind == "custom":
            return {CUSTOM_INPUT: self.arguments}
        try:
            arguments = json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            return self.arguments
        except RecursionError as exc:
            raise APIError(400, "tool call arguments are nested too deeply", param=self.param) from exc
        return arguments if isinstance(arguments, dict) else self.arguments

    def arguments_json(self) -> str:
        return json.dumps(self.arguments_object(), ensure_ascii=False) if self.kind == "custom" else self.arguments


@dataclass
class Turn:
    """One message: system/developer/user text, an assistant turn (reasoning, text, calls) or a tool result."""

    role: Role
    text: str = ""
    reasoning: str | None = None  # assistant: its chain of thought, when the client sends it back
    tool_calls: list[ToolCallItem] = field(default_factory=list)
    call_id: str | None = None  # tool: the call it answers
    name: str | None = None  # tool: the tool's name (else looked up from the call); others: a speaker name


@dataclass
class Conversation:
    """Everything a prompt is rendered from, and what constrains and parses the output."""

    turns: list[Turn]
    tools: list[Tool] = field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | str = "auto"  # a str other than those: the named tool
    parallel_tool_calls: bool = True
    output_format: StructuredOutput | None = None  # response_format / text.format (json_object or json_schema)
    output_format_param: str = "response_format"
    reasoning_effort: Effort | None = None  # any of OpenAI's values; server/conversation/reasoning.py maps it
    add_generation_prompt: bool = True
    param: str = "messages"  # the request field holding the turns (named when the prompt is too long)

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice == "auto":
            return "auto"
        if self.tool_choice == "required":
            return "required"
        return "named"

    def tool(self, name: str) -> Tool | None:
        return next((tool for tool in self.tools if tool.name == name), None)

    @property
    def named_tool(self) -> Tool | None:
        return self.tool(self.tool_choice) if self.tool_mode == "named" else None
