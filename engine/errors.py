"""Every error Minerva reports to a person rather than to a stack trace, in one module.

A command (`minerva serve`, `chat`, `generate`) catches `MinervaError` alone and prints its one-line
message, and the server maps each kind to its HTTP answer (server/errors.py): the loader's
ModelLoadError, the ConfigError of a setting, the ModelConfigError of a checkpoint that cannot make a
forward pass and the TokenizerError of unusable tokenizer files derive from it where they are raised;
the errors an engine client raises to the server are defined here, so the server imports them from
the engine's one public error module and never from the engine's internals.
"""

from __future__ import annotations


class MinervaError(Exception):
    """A problem with the user's input (a file, a setting, a request); the message says what and how to fix it."""


class ConfigError(MinervaError, ValueError):
    """A config file or setting is malformed; the message names the file and key."""


class InvalidRequestError(MinervaError, ValueError):
    """A request field is out of range; `param` names the field and `code` is OpenAI's error code, if any."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class GrammarError(MinervaError, ValueError):
    """A schema the grammar engine cannot compile (invalid JSON Schema or an unsupported feature)."""


class EngineDeadError(MinervaError, RuntimeError):
    """The engine cannot serve: never started, shut down, its core process gone or its parallel group broken."""


class ParallelGroupError(MinervaError, RuntimeError):
    """A tensor-parallel rank died or a collective timed out: the group cannot compute another step."""


class EngineCoreError(MinervaError):
    """The engine core process could not build the engine (its message says why)."""
