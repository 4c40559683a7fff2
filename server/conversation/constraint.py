"""The grammar a conversation's output must follow: its output format, or tool_choice required / a named tool.

Compiled in a killable worker process under the server's time limit before the request reaches
the engine (so the step loop never compiles), with an invalid or unsupported schema answered as a 400 naming the field.
"""

from __future__ import annotations

from typing import Any

from engine.client import EngineClient
from engine.errors import GrammarError
from engine.structured.spec import StructuredOutput
from server.conversation.items import Conversation
from server.errors import APIError


def output_constraint(conversation: Conversation) -> tuple[StructuredOutput, str] | None:
    """(what the output must match, the request field it came from), or None for free text."""
    mode = conversation.tool_mode
    named = conversation.named_tool
    if named is not None:
        if named.kind == "custom":  # its whole output is the input: free text, or text matching its grammar
            if named.grammar is None:
                return None
            return (StructuredOutput.from_grammar(named.grammar.syntax, named.grammar.definition),
                    f"{named.param}.format.definition")
        return StructuredOutput.from_schema(named.schema), f"{named.param}.parameters"
    if mode == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.schema},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in conversation.tools]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not conversation.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutput.from_schema(schema), "tools"
    if conversation.output_format is None:
        return None
    return conversation.output_format, conversation.output_format_param


async def compile_constraint(engine: EngineClient, conversation: Conversation) -> StructuredOutput | None:
    """The conversation's constraint, compiled (and cached) off the event loop and off the engine's step loop."""
    found = output_constraint(conversation)
    if found is None:
        return None
    spec, param = found
    try:
        await engine.compile_structured(spec)
    except GrammarError as exc:
        what = "grammar" if spec.kind in ("regex", "lark") else "schema"
        raise APIError(400, f"{param}: this {what} cannot be used for constrained decoding: {exc}",
                       param=param, code="invalid_schema") from exc
    return spec
