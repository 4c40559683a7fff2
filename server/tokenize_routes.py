"""POST /tokenize and POST /detokenize, in vLLM's shape, so clients can count and inspect tokens.

/tokenize takes a `prompt` (encoded as /v1/completions would, special tokens added by
default) or chat `messages` (rendered through the model's chat template exactly as
/v1/chat/completions renders them) and answers `count`, `max_model_len`, `tokens` and,
when asked, `token_strs`. /detokenize turns `tokens` back into the `prompt` text.
Both sit behind the API-key guard like the /v1 routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from server.chat import conversation_of
from server.conversation import render_prompt
from server.errors import APIError
from server.protocol import APIModel, ChatCompletionRequest, ChatMessage, NonNegativeInt
from server.served_models import ServedModel
from server.tokens import encode

router = APIRouter()


class TokenizeRequest(APIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # prompts only: a rendered chat template carries its own
    add_generation_prompt: bool = True  # messages only
    return_token_strs: bool = False


class DetokenizeRequest(APIModel):
    model: str | None = None
    tokens: list[NonNegativeInt]


def tokenize(served: ServedModel, body: TokenizeRequest) -> list[int]:
    if body.messages is not None and body.prompt is None:
        chat = ChatCompletionRequest(model=body.model, messages=body.messages,
                                     add_generation_prompt=body.add_generation_prompt)
        return render_prompt(served.engine, conversation_of(chat))
    if body.prompt is not None and body.messages is None:
        return encode(served.engine.tokenizer, body.prompt, add_special_tokens=body.add_special_tokens, param="prompt")
    raise APIError(400, "give exactly one of prompt and messages", param="prompt")


@router.post("/tokenize")
async def create_tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    served: ServedModel = request.app.state.models.resolve(body.model)
    tokens = await asyncio.to_thread(tokenize, served, body)
    tokenizer = served.engine.tokenizer
    return {"count": len(tokens), "max_model_len": served.engine.max_model_len, "tokens": tokens,
            "token_strs": [tokenizer.id_to_token(t) for t in tokens] if body.return_token_strs else None}


@router.post("/detokenize")
async def create_detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    served: ServedModel = request.app.state.models.resolve(body.model)
    tokenizer = served.engine.tokenizer
    for index, token in enumerate(body.tokens):
        if token >= tokenizer.vocab_size:
            raise APIError(400, f"tokens.{index}: token id {token} is outside the vocabulary "
                                f"(0..{tokenizer.vocab_size - 1})", param=f"tokens.{index}")
    return {"prompt": await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)}
