"""An Anthropic Messages request -> the core's Conversation (system, turns, tools, tool choice, reasoning).

Each piece names the request field it came from, so a block or tool Minerva cannot use is a 400
naming it (`messages.2.content.0`, `tools.1`). Anthropic's server-side tools (typed like
`web_search_20250305`) run on Anthropic's servers, not here: they are skipped with a log line,
never a 400 that would stop an agent.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.structured.spec import StructuredOutput
from server.conversation import Conversation, Tool, ToolCallItem, Turn, repeated_tool_name, unoffered_tool
from server.conversation.reasoning import Effort
from server.errors import APIError
from server.messages.protocol import CountTokensRequest, InputMessage, OutputConfig, Thinking, ToolChoice

logger = logging.getLogger("minerva.server")

CLIENT_TOOL_TYPES = (None, "custom")  # a tool the client runs, described by input_schema
# thinking budget_tokens below each limit -> that effort; above the last, "high"
REASONING_BUDGETS: tuple[tuple[int, Effort], ...] = ((4096, "low"), (16384, "medium"))
UNREADABLE_BLOCKS = ("image", "document", "search_result", "container_upload")


def unsupported(what: str, param: str) -> APIError:
    return APIError(400, f"{param}: {what}", param=param, code="unsupported_content")


def block_text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"{param}.text: a text block needs a string `text`", param=f"{param}.text")
    return text


def text_of(content: str | list[dict[str, Any]] | None, param: str) -> str:
    """System text or a tool result's content: a string or text blocks (joined by newlines)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, block in enumerate(content):
        kind = block.get("type")
        if kind in UNREADABLE_BLOCKS:
            raise unsupported(f"{kind} blocks are not supported: this server reads text only", f"{param}.{index}")
        if kind != "text":
            raise unsupported(f"unsupported content block type {kind!r} here (text only)", f"{param}.{index}")
        texts.append(block_text(block, f"{param}.{index}"))
    return "\n".join(texts)


def message_turns(message: InputMessage, index: int, call_names: dict[str, str]) -> list[Turn]:
    """A user message -> tool results and user text in their order; an assistant or system message -> one turn."""
    param = f"messages.{index}.content"
    if message.role == "system":
        return [Turn("system", text_of(message.content, param))]
    blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
    if message.role == "assistant":
        return [assistant_turn(blocks, param, call_names)]
    turns: list[Turn] = []
    for position, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}.{position}"
        if kind == "text":
            text = block_text(block, where)
            if turns and turns[-1].role == "user":
                turns[-1].text += "\n" + text
            else:
                turns.append(Turn("user", text))
        elif kind == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str):
                raise APIError(400, f"{where}.tool_use_id: a tool_result needs the id of its tool_use",
                               param=f"{where}.tool_use_id")
            turns.append(Turn("tool", text_of(block.get("content"), f"{where}.content"), call_id=call_id,
                              name=call_names.get(call_id)))
        elif kind in UNREADABLE_BLOCKS:
            raise unsupported(f"{kind} blocks are not supported: this server reads text only", where)
        else:
            raise unsupported(f"unsupported content block type {kind!r} in a user message", where)
    return turns


def assistant_turn(blocks: list[dict[str, Any]], param: str, call_names: dict[str, str]) -> Turn:
    """Thinking -> the turn's reasoning (redacted thinking, Anthropic's sealed text, is dropped); text; tool_use."""
    turn = Turn("assistant")
    for position, block in enumerate(blocks):
        kind, where = block.get("type"), f"{param}.{position}"
        if kind == "text":
            turn.text += block_text(block, where)
        elif kind == "thinking":
            thinking = block.get("thinking")
            if isinstance(thinking, str) and thinking:
                turn.reasoning = (turn.reasoning or "") + thinking
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
                raise APIError(400, f"{where}: a tool_use block needs a string id and name and an object input",
                               param=where)
            call_names[call_id] = name
            turn.tool_calls.append(ToolCallItem(call_id, name, json.dumps(arguments, ensure_ascii=False),
                                                param=f"{where}.input"))
        else:
            raise unsupported(f"unsupported content block type {kind!r} in an assistant message", where)
    return turn


def client_tools(tools: list[dict[str, Any]] | None) -> list[Tool]:
    found: list[Tool] = []
    for index, tool in enumerate(tools or []):
        param = f"tools.{index}"
        name = tool.get("name")
        if tool.get("type") not in CLIENT_TOOL_TYPES:
            logger.warning("%s: Anthropic server tool %r (type %s) skipped: it runs on Anthropic's servers only",
                           param, name, tool.get("type"))
            continue
        schema = tool.get("input_schema")
        if not isinstance(name, str) or not name or not isinstance(schema, dict):
            raise APIError(400, f"{param}: a tool needs a name and an input_schema object", param=param)
        description = tool.get("description")
        found.append(Tool(name, description if isinstance(description, str) else "", schema, param=param))
    repeated = repeated_tool_name(tool.name for tool in found)
    if repeated is not None:
        raise APIError(400, f"tools: tool names must be unique ({repeated!r} is offered twice)", param="tools")
    return found


def tool_choice_of(choice: ToolChoice | None, tools: list[Tool]) -> str:
    """auto -> "auto", any -> "required", tool -> its name, none -> "none" (the core's tool_choice)."""
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "none":
        return "none"
    if not tools:
        raise APIError(400, f"tool_choice: type {choice.type!r} requires tools", param="tool_choice")
    if choice.type == "any":
        return "required"
    unoffered = unoffered_tool(choice.name, [tool.name for tool in tools])
    if unoffered:
        raise APIError(400, f"tool_choice.name: names {unoffered}", param="tool_choice.name")
    return str(choice.name)  # offered, so not None


def reasoning_effort(thinking: Thinking | None, config: OutputConfig | None) -> Effort | None:
    """`output_config.effort`, else the thinking budget, as the core's reasoning effort (which
    server/conversation/reasoning.py maps onto the model): disabled thinking is "none", adaptive the model's default."""
    if config is not None and config.effort is not None:
        return config.effort
    if thinking is None or thinking.type in ("adaptive", "between_tools"):
        return None
    if thinking.type == "disabled":
        return "none"
    if thinking.budget_tokens is None:
        raise APIError(400, "thinking.budget_tokens: required when thinking is enabled", param="thinking.budget_tokens")
    return next((effort for limit, effort in REASONING_BUDGETS if thinking.budget_tokens < limit), "high")


def conversation_of(body: CountTokensRequest) -> Conversation:
    """The request as the core's conversation; the model answers after the last (user) message."""
    if body.messages[-1].role == "assistant":
        raise APIError(400, "messages: a final assistant message (prefill) is not supported; end with a user message",
                       param=f"messages.{len(body.messages) - 1}", code="unsupported_content")
    turns: list[Turn] = []
    system = text_of(body.system, "system")
    if system:
        turns.append(Turn("system", system))
    call_names: dict[str, str] = {}
    for index, message in enumerate(body.messages):
        turns += message_turns(message, index, call_names)
    tools = client_tools(body.tools)
    choice = body.tool_choice
    parallel = not (choice is not None and choice.disable_parallel_tool_use)
    config = body.output_config
    output_format = StructuredOutput.from_schema(config.format.schema_) if config and config.format else None
    return Conversation(turns, tools, tool_choice_of(choice, tools), parallel, output_format,
                        "output_config.format.schema", reasoning_effort(body.thinking, config), param="messages")
