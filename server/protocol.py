"""OpenAI request bodies as pydantic models: the fields we honour, the ones we refuse, and their ranges.

Unknown extra fields are ignored (as vLLM does) so that clients sending newer
OpenAI fields keep working; fields we know but cannot honour are refused with
a 400 naming the field (see `unsupported_fields`). An explicit `null` means "not
set" everywhere: OpenAI's spec makes its fields nullable and the official SDK
sends null for a caller's None (tests/test_protocol_fidelity.py checks every
field the SDK can send).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling_params import FIELD_BOUNDS
from server.conversation.items import repeated_tool_name, unoffered_tool
from server.conversation.reasoning import Effort

NonNegativeInt = Annotated[int, Field(ge=0)]


class APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: Any) -> Any:
        """`"field": null` takes the field's default (a required field stays missing, and is named as such)."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(APIModel):
    include_usage: bool = False


class SamplingFields(APIModel):
    """The sampling knobs shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the only (or first) served model
    n: int = Field(1, **(FIELD_BOUNDS["n"] | {"le": 128}))  # 128: a protocol cap (operators lower it with --max-n)
    temperature: float | None = Field(None, **FIELD_BOUNDS["temperature"])
    top_p: float | None = Field(None, **FIELD_BOUNDS["top_p"])
    top_k: int | None = Field(None, **FIELD_BOUNDS["top_k"])
    min_p: float | None = Field(None, **FIELD_BOUNDS["min_p"])
    presence_penalty: float | None = Field(None, **FIELD_BOUNDS["presence_penalty"])
    frequency_penalty: float | None = Field(None, **FIELD_BOUNDS["frequency_penalty"])
    repetition_penalty: float | None = Field(None, **FIELD_BOUNDS["repetition_penalty"])
    seed: int | None = Field(None, **FIELD_BOUNDS["seed"])
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, **FIELD_BOUNDS["min_tokens"])
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = Field(None, **FIELD_BOUNDS["n"])  # completions: the best `n` of this many samples
    prompt_logprobs: int | None = Field(None, **FIELD_BOUNDS["prompt_logprobs"])  # vLLM's: top logprobs per prompt token

    @property
    def samples(self) -> int:
        """Samples generated per prompt: best_of when it asks for more than n."""
        return max(self.n, self.best_of or 0)

    @property
    def stop_sequences(self) -> list[str]:
        """`stop` as a list, whichever of OpenAI's two shapes the client sent."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    max_tokens: int | None = Field(16, **FIELD_BOUNDS["max_tokens"])
    logprobs: int | None = Field(None, **FIELD_BOUNDS["logprobs"])
    echo: bool = False
    suffix: str | None = None


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes (string, strings, token ids, lists of token ids) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class FunctionCall(APIModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(APIModel):
    """A call an assistant message made earlier in the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier turn's reasoning, as this server returned it
    refusal: str | None = None  # an assistant's earlier refusal (OpenAI's models return one instead of content)


class FunctionDefinition(APIModel):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema; absent means a function without arguments
    strict: bool | None = None


class ChatTool(APIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(APIModel):
    name: str


class NamedToolChoice(APIModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(APIModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, **FIELD_BOUNDS["max_tokens"])
    max_completion_tokens: int | None = Field(None, **FIELD_BOUNDS["max_tokens"])
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **FIELD_BOUNDS["logprobs"])
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    reasoning_effort: Effort | None = None  # every value of the spec; server/conversation/reasoning.py maps it
    add_generation_prompt: bool = True
    # Spec fields Minerva cannot honour: refused when set (see `unsupported_fields`); the spec's hints
    # (store, metadata, prediction, service_tier, verbosity, prompt_cache_*, ...) are ignored.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    @property
    def tool_mode(self) -> str:
        """How tools take part: "none", "auto", "required" or "named" (tool_choice names one function)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"


class ModelCheckRequest(APIModel):
    """POST /v1/minerva/models/check: served model ids (and, when enabled, file paths) to check."""

    models: list[str] = Field(min_length=1, max_length=256)


def unsupported_fields(request: SamplingFields) -> list[tuple[str, str]]:
    """(param, why) for each field set to something Minerva cannot honour; the first becomes the 400."""
    problems: list[tuple[str, str]] = []
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "stream_options is only allowed when stream is true"))
    if request.best_of is not None and request.best_of < request.n:
        problems.append(("best_of", "best_of must be at least n"))
    if request.samples > request.n and (request.stream or not isinstance(request, CompletionRequest)):
        problems.append(("best_of", "best_of greater than n is only for non-streamed /v1/completions"))
    if isinstance(request, CompletionRequest):
        if request.suffix:
            problems.append(("suffix", "suffix (fill-in-the-middle) is not supported"))
    if isinstance(request, ChatCompletionRequest):
        problems += chat_problems(request)
        problems += tool_problems(request)
        if request.top_logprobs is not None and not request.logprobs:
            problems.append(("top_logprobs", "top_logprobs requires logprobs to be true"))

    return problems


def chat_problems(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """Chat features of the spec that a text-only local server does not have."""
    problems: list[tuple[str, str]] = []
    if request.audio is not None:
        problems.append(("audio", "audio output is not supported"))
    if request.modalities and set(request.modalities) != {"text"}:
        problems.append(("modalities", "only the text modality is supported"))
    if request.functions is not None:
        problems.append(("functions", "functions (deprecated) is not supported: use tools"))
    if request.function_call is not None:
        problems.append(("function_call", "function_call (deprecated) is not supported: use tool_choice"))
    if request.moderation is not None:
        problems.append(("moderation", "moderation is not supported"))
    if request.web_search_options is not None:
        problems.append(("web_search_options", "web search is not supported"))
    return problems


def tool_problems(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """A tool_choice that cannot be met by these tools, or that fights response_format for the output."""
    problems: list[tuple[str, str]] = []
    choice = request.tool_choice
    if choice is not None and choice != "none" and choice != "auto" and not request.tools:
        problems.append(("tool_choice", "tool_choice requires tools"))
    names = [tool.function.name for tool in request.tools or []]
    unoffered = unoffered_tool(choice.function.name, names) if isinstance(choice, NamedToolChoice) else None
    if unoffered and request.tools:
        problems.append(("tool_choice", f"tool_choice names function {unoffered}"))
    repeated = repeated_tool_name(names)
    if repeated is not None:
        problems.append(("tools", f"tool function names must be unique ({repeated!r} is offered twice)"))
    response_format = request.response_format
    if response_format and response_format.type == "json_schema" and (
            response_format.json_schema is None or response_format.json_schema.schema_ is None):
        problems.append(("response_format.json_schema", "response_format json_schema needs json_schema.schema"))
    if response_format and response_format.type != "text" and request.tool_mode in ("required", "named"):
        problems.append(("response_format", "response_format cannot be combined with tool_choice "
                                            "required or a named function"))
    return problems
