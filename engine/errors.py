"""The root of every error Minerva reports to a person rather than to a stack trace.

A command (`minerva serve`, `chat`, `generate`) catches `MinervaError` alone and prints
its one-line message: the loader's ModelLoadError, the ConfigError of a setting, the
ModelConfigError of a checkpoint that cannot make a forward pass, the TokenizerError of
unusable tokenizer files and the InvalidRequestError of a request all derive from it,
so a new error kind only has to subclass it to be reported cleanly.
"""

from __future__ import annotations


class MinervaError(Exception):
    """A problem with the user's input (a file, a setting, a request); the message says what and how to fix it."""


class ConfigError(MinervaError, ValueError):
    """A config file or setting is malformed; the message names the file and key."""
