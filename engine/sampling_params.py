"""Per-request generation settings, validated once at the door."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from engine.errors import InvalidRequestError
from engine.structured.spec import StructuredOutput


# Seeds are 64-bit, signed or not (OpenAI documents an int64; torch generators take either).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM uses the same epsilon)

# Each numeric field's range, in pydantic's terms: SamplingParams enforces them here and the HTTP
# protocol declares the same ones (so they reach the OpenAPI schema), so a range is written once.
class Bounds(TypedDict, total=False):
    """A numeric range in pydantic `Field`'s keywords, so the protocol can pass it as `**bounds`."""

    ge: float
    gt: float
    le: float
    lt: float


FIELD_BOUNDS: dict[str, Bounds] = {
    "n": {"ge": 1},
    "max_tokens": {"ge": 1},
    "min_tokens": {"ge": 0},
    "temperature": {"ge": 0.0, "le": 2.0},
    "top_p": {"gt": 0.0, "le": 1.0},
    "top_k": {"ge": -1},  # -1 and 0: disabled
    "min_p": {"ge": 0.0, "le": 1.0},
    "repetition_penalty": {"gt": 0.0},
    "presence_penalty": {"ge": -2.0, "le": 2.0},
    "frequency_penalty": {"ge": -2.0, "le": 2.0},
    "logprobs": {"ge": 0, "le": 20},
    "prompt_logprobs": {"ge": 0, "le": 20},
    "seed": {"ge": SEED_MIN, "le": SEED_MAX},
}
_TESTS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
          "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}


def bounds_problem(name: str, value: float | None) -> str | None:
    """Why `value` is outside `FIELD_BOUNDS[name]`, or None (None values are "not set")."""
    if value is None:
        return None
    bounds = FIELD_BOUNDS[name]
    if all(_TESTS[kind][0](value, bound) for kind, bound in bounds.items()):
        return None
    return f"{name} must be " + " and ".join(f"{_TESTS[kind][1]} {bound}" for kind, bound in bounds.items())


@dataclass
class SamplingParams:
    """vLLM-style sampling parameters; `temperature` 0 (or below GREEDY_BELOW) means greedy."""

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token; 0 = only the chosen one
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # output must match this grammar (JSON schema/object)
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (engine/logit_bias.py)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (engine/prompt_logprobs.py); None: not asked

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in FIELD_BOUNDS:
            problem = bounds_problem(name, getattr(self, name))
            if problem:
                raise InvalidRequestError(problem, name)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", "min_tokens")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")

    def ending_token_ids(self, eos_token_ids: list[int]) -> frozenset[int]:
        """The ids that end a sample once min_tokens are out (and add no text): its stop ids, and EOS unless
        ignored. Read by the engine's token rules and by whichever process detokenizes."""
        return frozenset(self.stop_token_ids) | frozenset(() if self.ignore_eos else eos_token_ids)

    @property
    def greedy(self) -> bool:
        """Temperatures this small divide logits into inf/nan (1e-40 gave empty output, finish "stop"):
        they mean the most likely token, as 0 does."""
        return self.temperature < GREEDY_BELOW
