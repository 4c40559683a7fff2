"""Tool-call parsers per model family, picked from the chat template (or `--tool-call-parser`).

gpt-oss's harmony format is parsed by server/conversation/harmony.py (it also splits out reasoning)."""

from __future__ import annotations

from server.tool_parsers.base import ParsedMessage, ToolCall, ToolParser
from server.tool_parsers.forced import NamedFunctionParser, RequiredToolsParser
from server.tool_parsers.hermes import HermesParser
from server.tool_parsers.llama3 import Llama3JsonParser
from server.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesParser, Llama3JsonParser, MistralParser)
}


def detect_parser_name(chat_template: str | None) -> str:
    """The family whose call markers the chat template writes; hermes (ChatML's convention) otherwise."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def parser_named(name: str) -> ToolParser:
    return PARSERS[name]()


__all__ = ["PARSERS", "NamedFunctionParser", "ParsedMessage", "RequiredToolsParser", "ToolCall", "ToolParser",
           "detect_parser_name", "parser_named"]
