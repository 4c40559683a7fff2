"""`--speculative-config`: vLLM's JSON shape, checked once here."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError

METHODS = ("ngram", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's field names; the suffix fields are those of vLLM's suffix decoding (Arctic Inference)."""

    method: str
    num_speculative_tokens: int = 5  # the most tokens proposed for one sequence in one step
    prompt_lookup_min: int = 2  # n-gram: the shortest tail that may match
    prompt_lookup_max: int = 5  # n-gram: the longest tail tried first
    disable_by_batch_size: int | None = 32  # no proposals in a step with this many running sequences or more (None: no cap)
    suffix_decoding_max_tree_depth: int = 24  # suffix: longest indexed substring (match + continuation)
    suffix_decoding_max_cached_requests: int = 1000  # suffix: finished outputs kept in the global cache
    suffix_decoding_max_spec_factor: float = 1.0  # suffix: propose at most factor * match length tokens
    suffix_decoding_min_token_prob: float = 0.1  # suffix: stop once the continuation's estimated probability drops below

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"speculative_config.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "disable_by_batch_size",
                     "suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests"):
            value = getattr(self, name)
            if value is None and name == "disable_by_batch_size":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"speculative_config.{name} must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError("speculative_config.prompt_lookup_min must not exceed prompt_lookup_max")
        if not self.suffix_decoding_max_spec_factor > 0:
            raise ConfigError("speculative_config.suffix_decoding_max_spec_factor must be positive")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ConfigError("speculative_config.suffix_decoding_min_token_prob must be in [0, 1]")

    @classmethod
    def parse(cls, value: "str | dict[str, Any] | SpeculativeConfig") -> "SpeculativeConfig":
        """From the flag's JSON text, a TOML table or a config already made."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"speculative_config is not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError("speculative_config must be a JSON object")
        if "method" not in value:
            raise ConfigError(f"speculative_config needs a method ({' or '.join(METHODS)})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config: unknown field(s): {', '.join(unknown)}")
        return cls(**value)
