"""The messages between API server processes and their engine core process (engine/core_process.py).

msgspec's msgpack: typed decoding straight into the engine's own types (SamplingParams, RequestOutput,
EngineStats) with no hand-written converters, and among the fastest Python serializers. Each
direction is one tagged union, so a receiver decodes any message with one `Decoder`. The core sends
one step's outputs for one API process as one `Outputs` message, not one per request; requests and
aborts travel as [client name, message] frames, so several API processes share one core.
"""

from __future__ import annotations

import msgspec

from engine.outputs import RequestOutput
from engine.reports import EngineDescription, EngineStats
from engine.sampling_params import SamplingParams


# --- API server -> core (on the core's requests socket, after the sender's name) ----------------------
class AddRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt: str | list[int]
    params: SamplingParams


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class FinishSamples(msgspec.Struct, tag=True):
    """Samples a stop string ended in the API process (it makes the text): (request id, sample index, the stop)."""

    samples: list[tuple[str, int, str]]


class ClientGone(msgspec.Struct, tag=True):
    """From the launcher: an API process died; the core aborts every request it sent."""

    client: str


class Shutdown(msgspec.Struct, tag=True):
    """Stop stepping (running requests end with finish_reason "abort") and exit."""


CoreInput = AddRequest | Abort | FinishSamples | ClientGone | Shutdown


# --- API server -> core (on the core's outputs socket, once, to be known by name) -----------------------
class Hello(msgspec.Struct, tag=True):
    """Send me outputs and stats; answered with Ready once the engine is built (or LoadFailed)."""


# --- core -> API server --------------------------------------------------------------------------------
class Ready(msgspec.Struct, tag=True):
    description: EngineDescription
    stats: EngineStats


class LoadFailed(msgspec.Struct, tag=True):
    """The engine could not be built; `message` is the MinervaError's (or exception's) text."""

    message: str


class Outputs(msgspec.Struct, tag=True):
    """Token ids with empty text (the API process detokenizes: engine/stream_text.py); a request's
    `prompt_token_ids` travel in its first output only (the API process puts them back)."""

    outputs: list[RequestOutput]


class RequestFailed(msgspec.Struct, tag=True):
    """A request refused by the engine: an InvalidRequestError with its param and code."""

    request_id: str
    message: str
    param: str | None = None
    code: str | None = None


class Stats(msgspec.Struct, tag=True):
    stats: EngineStats


class Fatal(msgspec.Struct, tag=True):
    """The engine stopped for good (a tensor-parallel rank died); the core exits after sending it."""

    reason: str


CoreOutput = Ready | LoadFailed | Outputs | RequestFailed | Stats | Fatal

encode = msgspec.msgpack.Encoder().encode
decode_input = msgspec.msgpack.Decoder(CoreInput).decode
decode_hello = msgspec.msgpack.Decoder(Hello).decode
decode_output = msgspec.msgpack.Decoder(CoreOutput).decode
