"""A conversation made ready for the engine: prompt ids, the output grammar, the output parser and the budget."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from engine.client import EngineClient
from engine.prompt_rules import completion_budget
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutput
from server.conversation.harmony import HarmonyParser, uses_harmony
from server.conversation.items import Conversation
from server.conversation.output import OutputEvents
from server.conversation.parsing import tool_parser_for
from server.conversation.constraint import compile_constraint
from server.conversation.render import render_prompt
from server.tool_parsers import ToolParser


@dataclass
class PreparedPrompt:
    conversation: Conversation
    prompt: list[int]
    max_tokens: int  # the requested limit clamped to what the context has left
    constraint: StructuredOutput | None
    parser: ToolParser | None  # None: the output is plain text

    def apply(self, params: SamplingParams) -> SamplingParams:
        """The grammar, and special tokens kept in the text when the parser reads call markers."""
        params.structured = self.constraint
        if self.parser is not None and self.parser.needs_special_tokens:
            params.skip_special_tokens = False
        return params

    def events(self, n: int = 1) -> OutputEvents:
        """A fresh engine-output -> events converter for one request of `n` samples per prompt."""
        return OutputEvents(self.conversation, self.parser, n)


def output_parser(engine: EngineClient, conversation: Conversation, override: str | None) -> ToolParser | None:
    """Harmony's channels for gpt-oss (unless a grammar forces the call's JSON), else the tool parser, if any."""
    if uses_harmony(engine.model_info.architecture, engine.tokenizer) and conversation.tool_mode in ("none", "auto"):
        return HarmonyParser()
    return tool_parser_for(conversation, engine.tokenizer.chat_template, override)


async def prepare(engine: EngineClient, conversation: Conversation, *, max_tokens: int | None,
                  tool_call_parser: str | None = None) -> PreparedPrompt:
    """Render (templates and tokenizing off the event loop), compile the grammar, pick the parser, clamp the budget.

    `max_tokens` None: whatever the context has left. `tool_call_parser` is the server's --tool-call-parser.
    """
    prompt = await asyncio.to_thread(render_prompt, engine, conversation)
    constraint = await compile_constraint(engine, conversation)
    budget = completion_budget(len(prompt), max_tokens, engine.max_model_len, param=conversation.param)
    return PreparedPrompt(conversation, prompt, budget, constraint, output_parser(engine, conversation, tool_call_parser))
