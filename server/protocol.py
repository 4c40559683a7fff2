"""OpenAI request bodies as pydantic models: the fields we honour, the ones we refuse, and their ranges.

Unknown extra fields are ignored (as vLLM does) so that clients sending newer
OpenAI fields keep working; fields we know but cannot honour are refused with
a 400 naming the field (see `unsupported_fields`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.sampling_params import SEED_MIN, SEED_MAX

NonNegativeInt = Annotated[int, Field(ge=0)]


class APIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(APIModel):
    include_usage: bool = False


class SamplingFields(APIModel):
    """The sampling knobs shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the only (or first) served model
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[NonNegativeInt] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[NonNegativeInt] | list[list[NonNegativeInt]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes (string, strings, token ids, lists of token ids) as a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


class ChatMessage(APIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(APIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True


class ModelCheckRequest(APIModel):
    """POST /v1/minerva/models/check: served model ids (and, when enabled, file paths) to check."""

    models: list[str] = Field(min_length=1, max_length=256)


def unsupported_fields(request: SamplingFields) -> list[tuple[str, str]]:
    """(param, why) for each field set to something Minerva cannot honour; the first becomes the 400."""
    problems: list[tuple[str, str]] = []
    if request.logit_bias:
        problems.append(("logit_bias", "logit_bias is not supported"))
    if request.stream_options is not None and not request.stream:
        problems.append(("stream_options", "stream_options is only allowed when stream is true"))
    if request.best_of is not None and request.best_of != request.n:
        problems.append(("best_of", "best_of other than n is not supported"))
    if isinstance(request, CompletionRequest):
        if request.suffix:
            problems.append(("suffix", "suffix (fill-in-the-middle) is not supported"))
        if request.echo and request.logprobs is not None:
            problems.append(("echo", "echo together with logprobs (prompt logprobs) is not supported"))
    if isinstance(request, ChatCompletionRequest):
        if request.response_format and request.response_format.type != "text":
            problems.append(("response_format", f"response_format {request.response_format.type} is not supported; "
                                                "only text"))
        if request.tools and request.tool_choice != "none":
            problems.append(("tools", "tool calling is not supported"))
        if request.top_logprobs is not None and not request.logprobs:
            problems.append(("top_logprobs", "top_logprobs requires logprobs to be true"))
    return problems
