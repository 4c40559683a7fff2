"""Input items in every shape OpenAI accepts -> one canonical shape (the one GET .../input_items returns).

A string input is one user message; a message's content may be a string or parts; items may omit
`type` (then they are messages) and `id` (one is given). Sealed reasoning is opened here, so the rest
of the server sees its text. Item types a text model cannot take part in (web search results, computer
calls, ...) are skipped with a warning; images and files in a message are a 400, since dropping them
would change the question, while in a tool's output (an agent's image-viewing tool) they become a
placeholder saying so, so that one tool result cannot end an agent's session.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from server.errors import APIError
from server.responses_api.sealing import ReasoningSeal, SealError

logger = logging.getLogger("minerva.server")

ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "custom_tool_call": "ctc",
               "custom_tool_call_output": "ctco", "reasoning": "rs"}
TEXT_PARTS = {"input_text", "output_text", "text", "summary_text", "reasoning_text"}


def new_item_id(kind: str) -> str:
    return f"{ID_PREFIXES[kind]}_{uuid.uuid4().hex}"


def canonical_items(raw: str | list[dict[str, Any]], seal: ReasoningSeal) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [message_item("user", raw)]
    items = []
    for index, item in enumerate(raw):
        canonical = canonical_item(item, f"input.{index}", seal)
        if canonical is not None:
            items.append(canonical)
    return items


def message_item(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "input_text", "text": text}
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": []}
    return {"id": item_id or new_item_id("message"), "type": "message", "role": role, "content": [part],
            "status": "completed"}


def canonical_item(item: dict[str, Any], param: str, seal: ReasoningSeal) -> dict[str, Any] | None:
    kind = item.get("type", "message" if "role" in item else None)
    item_id = item.get("id") if isinstance(item.get("id"), str) else None
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise APIError(400, f"{param}.role must be user, system, developer or assistant", param=f"{param}.role")
        return message_item(role, content_text(item.get("content"), f"{param}.content"), item_id)
    if kind in ("function_call", "custom_tool_call"):
        field = "arguments" if kind == "function_call" else "input"
        canonical = {"id": item_id or new_item_id(kind), "type": kind, "call_id": required_str(item, "call_id", param),
                     "name": required_str(item, "name", param), field: required_str(item, field, param),
                     "status": "completed"}
        if isinstance(item.get("namespace"), str):
            canonical["namespace"] = item["namespace"]
        return canonical
    if kind in ("function_call_output", "custom_tool_call_output"):
        return {"id": item_id or new_item_id(kind), "type": kind, "call_id": required_str(item, "call_id", param),
                "output": content_text(item.get("output"), f"{param}.output", text_only=False), "status": "completed"}
    if kind == "reasoning":
        return reasoning_item(item, item_id, param, seal)
    if kind == "item_reference":
        raise APIError(400, "item_reference input items are not supported: send the item itself, or continue with "
                            "previous_response_id", param=f"{param}.type", code="unsupported_parameter")
    logger.warning("responses: skipping input item of type %r (%s): this server has no such tool", kind, param)
    return None


def reasoning_item(item: dict[str, Any], item_id: str | None, param: str, seal: ReasoningSeal) -> dict[str, Any]:
    """Reasoning with its text in `content`: as sent, else opened from `encrypted_content` (a 400 if tampered)."""
    text = parts_text(item.get("content") or [], f"{param}.content")
    sealed = item.get("encrypted_content")
    if not text and isinstance(sealed, str) and sealed:
        try:
            text = seal.open(sealed)
        except SealError as exc:
            raise APIError(400, f"{param}.encrypted_content: {exc}", param=f"{param}.encrypted_content",
                           code="invalid_encrypted_content") from exc
    canonical: dict[str, Any] = {"id": item_id or new_item_id("reasoning"), "type": "reasoning",
                                 "summary": [{"type": "summary_text", "text": parts_text(item.get("summary") or [],
                                                                                         f"{param}.summary")}]
                                 if item.get("summary") else [],
                                 "content": [{"type": "reasoning_text", "text": text}] if text else [],
                                 "status": "completed"}
    if isinstance(sealed, str) and sealed:
        canonical["encrypted_content"] = sealed
    return canonical


def content_text(content: Any, param: str, text_only: bool = True) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return parts_text(content, param, text_only)
    raise APIError(400, f"{param} must be a string or a list of content parts", param=param)


def parts_text(parts: list[Any], param: str, text_only: bool = True) -> str:
    """Text parts joined; images, files and audio are refused (this server serves text models), or with
    `text_only` false replaced by a placeholder naming what was left out."""
    texts = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict):
            raise APIError(400, f"{param}.{index} must be a content part object", param=f"{param}.{index}")
        kind = part.get("type")
        if kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif not text_only:
            logger.warning("responses: %s.%d is %r content; the model is told it was left out", param, index, kind)
            texts.append(f"[{kind} left out: this model reads text only]")
        else:
            raise APIError(400, f"unsupported content part type {kind!r}: only text is supported",
                           param=f"{param}.{index}.type", code="unsupported_content")
    return "".join(texts)


def required_str(item: dict[str, Any], field: str, param: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        raise APIError(400, f"{param}.{field} is required and must be a string", param=f"{param}.{field}")
    return value


def item_text(item: dict[str, Any], field: str = "content") -> str:
    return "".join(part.get("text", "") for part in item.get(field) or [])
