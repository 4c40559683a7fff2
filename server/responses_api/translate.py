"""A Responses request (its canonical items, tools, tool_choice, text.format, reasoning) -> the core's Conversation.

Consecutive assistant-side items (reasoning, an assistant message, calls) form one assistant turn,
as the model produced them; a tool output becomes a tool turn naming the call it answers.
Built-in tool types (web search, file search, computer use, MCP, ...) are not this server's to run:
they are left out with a warning instead of a 400, so an agent that always sends them still works.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.structured.spec import StructuredOutput
from server.conversation import Conversation, Grammar, Tool, ToolCallItem, Turn, repeated_tool_name, unoffered_tool
from server.errors import APIError
from server.responses_api.items import item_text
from server.responses_api.request import ResponsesRequest

logger = logging.getLogger("minerva.server")

OfferedTool = tuple[dict[str, Any], str, str | None]  # a served tool as sent, its request field, its namespace


def conversation_of(body: ResponsesRequest, items: list[dict[str, Any]], offered: list[OfferedTool]) -> Conversation:
    """`offered`: served_tools(body.tools)."""
    tools = tools_of(offered)
    allowed = allowed_tools(body.tool_choice)
    if allowed is not None:
        tools = [tool for tool in tools if tool.name in allowed]
    choice = tool_choice_of(body.tool_choice, tools)
    if choice not in ("none", "auto") and not tools:
        raise APIError(400, "tool_choice requires tools", param="tool_choice")
    spec, spec_param = output_format(body)
    if spec is not None and choice not in ("none", "auto"):
        raise APIError(400, "text.format cannot be combined with tool_choice required or a named tool",
                       param="text.format")
    effort = body.reasoning.effort if body.reasoning is not None else None
    turns = ([Turn("developer", body.instructions)] if body.instructions else []) + turns_of(items)
    if not turns:
        raise APIError(400, "input must hold at least one message", param="input")
    return Conversation(turns, tools, choice, body.parallel_tool_calls, spec, spec_param,
                        effort, param="input")


def turns_of(items: list[dict[str, Any]]) -> list[Turn]:
    turns: list[Turn] = []
    call_names: dict[str, str] = {}

    def assistant(can_extend: bool) -> Turn:
        if turns and turns[-1].role == "assistant" and can_extend:
            return turns[-1]
        turns.append(Turn("assistant"))
        return turns[-1]

    for item in items:
        kind = item["type"]
        if kind == "message" and item["role"] != "assistant":
            turns.append(Turn(item["role"], item_text(item)))
        elif kind == "message":
            turn = assistant(bool(turns) and not turns[-1].tool_calls)
            turn.text += item_text(item)
        elif kind == "reasoning":
            turn = assistant(bool(turns) and not (turns[-1].text or turns[-1].tool_calls or turns[-1].reasoning))
            turn.reasoning = item_text(item) or item_text(item, "summary") or None
        elif kind in ("function_call", "custom_tool_call"):
            custom = kind == "custom_tool_call"
            call_names[item["call_id"]] = item["name"]
            assistant(True).tool_calls.append(ToolCallItem(
                item["call_id"], item["name"], item["input"] if custom else item["arguments"],
                "custom" if custom else "function", param="input"))
        else:  # function_call_output / custom_tool_call_output
            turns.append(Turn("tool", item["output"], call_id=item["call_id"], name=call_names.get(item["call_id"])))
    return turns


def served_tools(raw: list[dict[str, Any]]) -> list[OfferedTool]:
    """(tool, its request field, its namespace) for each function and custom tool, the members of `namespace`
    tools included (the model sees them as plain tools; their calls go out naming the namespace).
    Other types are skipped with a warning."""
    found: list[OfferedTool] = []
    for index, tool in enumerate(raw):
        kind = tool.get("type")
        if kind == "namespace" and isinstance(tool.get("name"), str) and isinstance(tool.get("tools"), list):
            members = [(inner, f"tools.{index}.tools.{j}") for j, inner in enumerate(tool["tools"])]
            found += [(inner, param, tool["name"]) for inner, param in members if served_kind(inner, param)]
        elif served_kind(tool, f"tools.{index}"):
            found.append((tool, f"tools.{index}", None))
    return found


def served_kind(tool: Any, param: str) -> bool:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind in ("function", "custom"):
        return True
    logger.warning("responses: skipping tool %s of type %r: only function and custom tools are served", param, kind)
    return False


def tool_namespaces(offered: list[OfferedTool]) -> dict[str, str]:
    """Tool name -> the namespace it was declared in."""
    return {name: namespace for tool, _, namespace in offered
            if namespace is not None and isinstance(name := tool.get("name"), str)}


def tools_of(offered: list[OfferedTool]) -> list[Tool]:
    tools: list[Tool] = []
    for tool, param, _ in offered:
        name = tool.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise APIError(400, f"{param}.name must be a string of 1 to 128 characters", param=f"{param}.name")
        description = tool.get("description") or ""
        if tool["type"] == "function":
            parameters = tool.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise APIError(400, f"{param}.parameters must be a JSON schema object", param=f"{param}.parameters")
            tools.append(Tool(name, description, parameters, param=param))
        else:
            grammar = custom_grammar(tool.get("format"), f"{param}.format")
            tools.append(Tool(name, description, kind="custom", grammar=grammar, param=param))
    repeated = repeated_tool_name(tool.name for tool in tools)
    if repeated is not None:
        raise APIError(400, f"tool names must be unique (namespaces' members included): {repeated!r} is offered twice",
                       param="tools")
    return tools


def custom_grammar(spec: Any, param: str) -> Grammar | None:
    if spec is None or (isinstance(spec, dict) and spec.get("type") == "text"):
        return None
    if (not isinstance(spec, dict) or spec.get("type") != "grammar" or spec.get("syntax") not in ("lark", "regex")
            or not isinstance(spec.get("definition"), str)):
        raise APIError(400, f"{param} must be {{type: text}} or {{type: grammar, syntax: lark|regex, definition}}",
                       param=param)
    return Grammar(spec["syntax"], spec["definition"])


def tool_choice_of(choice: str | dict[str, Any] | None, tools: list[Tool]) -> str:
    """"none" / "auto" / "required", or the named tool's name."""
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    kind = choice.get("type")
    if kind in ("function", "custom"):
        name = choice.get("name")
        unoffered = unoffered_tool(name if isinstance(name, str) else None, [t.name for t in tools if t.kind == kind])
        if unoffered:
            raise APIError(400, f"tool_choice names {kind} tool {unoffered}", param="tool_choice")
        return str(name)
    if kind == "allowed_tools":
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise APIError(400, "tool_choice.mode must be auto or required", param="tool_choice.mode")
        return str(mode)
    logger.warning("responses: tool_choice of type %r names a built-in tool this server does not run; using auto",
                   kind)
    return "auto"


def allowed_tools(choice: str | dict[str, Any] | None) -> set[str] | None:
    if not isinstance(choice, dict) or choice.get("type") != "allowed_tools":
        return None
    return {name for tool in choice.get("tools") or []
            if isinstance(tool, dict) and isinstance(name := tool.get("name"), str)}


def output_format(body: ResponsesRequest) -> tuple[StructuredOutput | None, str]:
    spec = body.text.format if body.text is not None else None
    if spec is None or spec.type == "text":
        return None, "text.format"
    if spec.type == "json_object":
        return StructuredOutput.json_object(), "text.format"
    if spec.schema_ is None:
        raise APIError(400, "text.format json_schema needs text.format.schema", param="text.format.schema")
    return StructuredOutput.from_schema(spec.schema_), "text.format.schema"
