"""What one HTTP request did, filled in as it runs and read once it ends (logs, metrics, token refunds).

The record lives in the ASGI scope's state, so the pure-ASGI middleware that
creates it and the route that fills it share it without globals.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.types import Scope

from engine.outputs import RequestOutput

STATE_KEY = "record"


@dataclass
class RequestRecord:
    started: float = field(default_factory=time.monotonic)
    client: str = ""  # the API key id, or the client's address when the server runs without keys
    key_id: str | None = None
    model: str | None = None
    prompt: object = None  # the prompt or messages as sent; kept only when the server logs prompts
    reserved_tokens: int | None = None  # taken from the client's tokens-per-minute budget, if any
    first_token_at: float | None = None
    _prompt_tokens: dict[int, int] = field(default_factory=dict)
    _completion_tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # by (prompt, sample)
    longest_sample: int = 0  # tokens of the longest sample: samples decode side by side
    _spec_tokens: dict[int, tuple[int, int]] = field(default_factory=dict)  # by prompt: (drafted, accepted)
    error: dict[str, str] | None = None  # a refused request's error code and message, for the request log

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt_tokens.values())

    @property
    def completion_tokens(self) -> int:
        return sum(self._completion_tokens.values())

    @property
    def spec_tokens(self) -> tuple[int, int]:
        """Speculative decoding: drafted tokens verified and accepted, over all prompts and samples."""
        return sum(d for d, _ in self._spec_tokens.values()), sum(a for _, a in self._spec_tokens.values())

    @property
    def generated_on(self) -> str | None:
        """The model this request generated with; None when it generated nothing."""
        return self.model if self._prompt_tokens else None

    def observe(self, prompt_index: int, output: RequestOutput) -> None:
        """Count the tokens of one engine output (a delta: each sample reports its running total)."""
        self._prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        if output.num_draft_tokens:
            self._spec_tokens[prompt_index] = (output.num_draft_tokens, output.num_accepted_tokens)
        for sample in output.outputs:
            self._completion_tokens[prompt_index, sample.index] = sample.num_generated
        self.longest_sample = max([self.longest_sample, *(sample.num_generated for sample in output.outputs)])
        if self.completion_tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()


def record_in(scope: Scope) -> RequestRecord:
    """The request's record, made by whichever middleware (or route, in bare-app tests) asks first."""
    state = scope.setdefault("state", {})
    if STATE_KEY not in state:
        state[STATE_KEY] = RequestRecord()
    record: RequestRecord = state[STATE_KEY]
    return record


def record_of(request: Request) -> RequestRecord:
    return record_in(request.scope)


async def recorded(record: RequestRecord,
                   outputs: AsyncGenerator[tuple[int, RequestOutput], None]
                   ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Pass the outputs through, counting tokens and the first token's time into `record`."""
    async with aclosing(outputs):
        async for prompt_index, output in outputs:
            record.observe(prompt_index, output)
            yield prompt_index, output


def note_request(request: Request, model: str, prompt: Callable[[], object]) -> RequestRecord:
    """Name the model a generation request runs on; `prompt` is called only if the server logs prompts."""
    record = record_of(request)
    record.model = model
    if request.app.state.settings.log_prompts:
        record.prompt = prompt()
    return record
