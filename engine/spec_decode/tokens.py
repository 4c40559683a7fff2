"""What a proposer reads from a sequence: its known tokens (engine.request.Sample has this shape)."""

from __future__ import annotations

from typing import Protocol


class TokenSource(Protocol):
    @property
    def num_known_tokens(self) -> int: ...

    def token_slice(self, begin: int, end: int) -> list[int]: ...
