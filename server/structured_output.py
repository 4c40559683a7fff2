"""The grammar a chat request's output must follow: response_format, or tool_choice required / a named function.

Compiled in a worker thread before the request reaches the engine (so the step loop never
compiles), with an invalid or unsupported schema answered as a 400 naming the field.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.structured import GrammarError, StructuredOutput
from server.errors import APIError
from server.protocol import ChatCompletionRequest, NamedToolChoice

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


def output_constraint(body: ChatCompletionRequest) -> tuple[StructuredOutput, str] | None:
    """(what the output must match, the request field it came from), or None for free text."""
    mode = body.tool_mode
    tools = body.tools or []
    if mode == "named":
        assert isinstance(body.tool_choice, NamedToolChoice)
        index = next(i for i, t in enumerate(tools) if t.function.name == body.tool_choice.function.name)
        return (StructuredOutput.from_schema(tools[index].function.parameters or NO_ARGUMENTS),
                f"tools.{index}.function.parameters")
    if mode == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": t.function.parameters or NO_ARGUMENTS},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not body.parallel_tool_calls:
            schema["maxItems"] = 1
        return StructuredOutput.from_schema(schema), "tools"
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput.json_object(), "response_format"
    assert response_format.json_schema is not None and response_format.json_schema.schema_ is not None
    return StructuredOutput.from_schema(response_format.json_schema.schema_), "response_format.json_schema.schema"


async def compile_constraint(engine: Any, body: ChatCompletionRequest) -> StructuredOutput | None:
    """The request's constraint, compiled (and cached) off the event loop and off the engine's step loop."""
    found = output_constraint(body)
    if found is None:
        return None
    spec, param = found
    try:
        await asyncio.to_thread(engine.grammars.compile, spec)
    except GrammarError as exc:
        raise APIError(400, f"{param}: this schema cannot be used for constrained decoding: {exc}",
                       param=param, code="invalid_schema") from exc
    return spec
