"""The messages between an API server process and its engine core process (engine/core_process.py).

msgspec's msgpack: typed decoding straight into the engine's own dataclasses (SamplingParams,
RequestOutput) with no hand-written converters, and among the fastest Python serializers. Each
direction is one tagged union, so a receiver decodes any message with one `Decoder`. The core
sends a step's outputs as one `Outputs` message, not one per request.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


# --- API server -> core ----------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt: str | list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    """Stop stepping (running requests end with finish_reason "abort") and exit."""


CoreInput = AddRequest | Abort | Shutdown


# --- core -> API server ----------------------------------------------------------------------------
class EngineDescription(msgspec.Struct):
    """What the API server knows of the engine only once it is built: the served context, the vocabulary
    the sampler draws from, and the start-up banner's facts."""

    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    kernels: str  # "torch" | "triton" | "cpu" (or the ops module's name)


class Ready(msgspec.Struct, tag=True):
    description: EngineDescription
    stats: dict[str, Any]


class LoadFailed(msgspec.Struct, tag=True):
    """The engine could not be built; `message` is the MinervaError's (or exception's) text."""

    message: str


class Outputs(msgspec.Struct, tag=True):
    """A request's `prompt_token_ids` travel in its first output only (ProcessEngineClient puts them back)."""

    outputs: list[RequestOutput]


class RequestFailed(msgspec.Struct, tag=True):
    """A request refused (`invalid`: an InvalidRequestError with its param and code) or ended because
    the engine stopped (`dead`: an EngineDeadError)."""

    request_id: str
    kind: str  # "invalid" | "dead"
    message: str
    param: str | None = None
    code: str | None = None


class Stats(msgspec.Struct, tag=True):
    stats: dict[str, Any]


class Fatal(msgspec.Struct, tag=True):
    """The engine stopped for good (a tensor-parallel rank died); the core exits after sending it."""

    reason: str


CoreOutput = Ready | LoadFailed | Outputs | RequestFailed | Stats | Fatal

encode = msgspec.msgpack.Encoder().encode
decode_input = msgspec.msgpack.Decoder(CoreInput).decode
decode_output = msgspec.msgpack.Decoder(CoreOutput).decode
