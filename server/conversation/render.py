"""A conversation -> prompt token ids: harmony for gpt-oss, else the model's chat template (with tools)."""

from __future__ import annotations

from typing import Any

from engine.client import EngineClient
from server.conversation.harmony import render_harmony, uses_harmony
from server.conversation.items import Conversation, Tool, Turn
from server.conversation.reasoning import template_arguments
from server.errors import APIError
from server.tokens import encode

# Architectures whose chat templates know the `developer` role; elsewhere it is sent as `system`.
DEVELOPER_ROLE_ARCHITECTURES = frozenset({"gpt_oss"})


def template_message(turn: Turn, keep_developer: bool) -> dict[str, Any]:
    """A turn as HF chat templates expect it: tool calls with object arguments, tool results with their id."""
    role = "system" if turn.role == "developer" and not keep_developer else turn.role
    rendered: dict[str, Any] = {"role": role, "content": turn.text}
    if turn.name is not None:
        rendered["name"] = turn.name
    if turn.tool_calls:
        rendered["tool_calls"] = [{"id": call.call_id, "type": "function",
                                   "function": {"name": call.name, "arguments": call.arguments_object()}}
                                  for call in turn.tool_calls]
    if turn.call_id is not None:
        rendered["tool_call_id"] = turn.call_id
    return rendered


def template_tool(tool: Tool) -> dict[str, Any]:
    """OpenAI's function shape, keys in its order (templates print it with `tojson`)."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.kind == "custom" or tool.parameters is not None:
        function["parameters"] = tool.schema
    return {"type": "function", "function": function}


def render_prompt(engine: EngineClient, conversation: Conversation) -> list[int]:
    """Token ids of the prompt; a 400 naming the conversation's field when the template refuses it."""
    tokenizer = engine.tokenizer
    architecture = engine.model_info.architecture
    if uses_harmony(architecture, tokenizer):
        return render_harmony(conversation)
    if not tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template; use /v1/completions", param=conversation.param)
    keep_developer = architecture in DEVELOPER_ROLE_ARCHITECTURES
    messages = [template_message(turn, keep_developer) for turn in conversation.turns]
    extra: dict[str, Any] = {}
    if conversation.tool_mode != "none":
        extra["tools"] = [template_tool(tool) for tool in conversation.tools]
    extra.update(template_arguments(conversation.reasoning_effort))
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=conversation.add_generation_prompt,
                                             **extra)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
        raise APIError(400, f"the chat template rejected these messages: {exc}", param=conversation.param) from exc
    return encode(tokenizer, text, add_special_tokens=False, param=conversation.param)
