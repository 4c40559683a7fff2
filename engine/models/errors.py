"""The one error a model raises when its config or weights cannot make a working forward pass."""

from __future__ import annotations

from engine.errors import MinervaError


class ModelConfigError(MinervaError, ValueError):
    """An unsupported architecture, an inconsistent config field, or a missing / misshapen tensor.

    The message names the offending field or tensor so the user can fix the checkpoint.
    """
