"""Speculation counters for /metrics and the logs, named after vLLM's `spec_decode_*` metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.reports import SpecDecodeCounters


@dataclass
class SpecDecodeStats:
    num_speculative_tokens: int
    num_drafts: int = 0  # sequence-steps that verified at least one drafted token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    propose_seconds: float = 0.0  # host time spent proposing
    accepted_per_position: list[int] = field(default_factory=list)  # drafts accepted at position j

    def __post_init__(self) -> None:
        self.accepted_per_position = [0] * self.num_speculative_tokens

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified sequence-step: the accepted drafts plus the one drawn token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> SpecDecodeCounters:
        return SpecDecodeCounters(num_drafts=self.num_drafts, num_draft_tokens=self.num_draft_tokens,
                                  num_accepted_tokens=self.num_accepted_tokens,
                                  accepted_per_position=list(self.accepted_per_position),
                                  acceptance_rate=self.acceptance_rate,
                                  mean_acceptance_length=self.mean_acceptance_length,
                                  propose_seconds=self.propose_seconds)
