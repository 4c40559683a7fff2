"""What an engine reports about itself to the server: its counters (EngineStats) and what it runs on
(EngineDescription).

msgspec structs, so the engine core process sends them to an API server typed (engine/wire.py), and
the server reads fields, never string keys: /metrics, /health, model cards and the start-up banner.
"""

from __future__ import annotations


import msgspec


class SpecDecodeCounters(msgspec.Struct, frozen=True):
    """Speculative decoding's counters (vLLM's spec_decode_* metrics)."""

    num_drafts: int  # sequence-steps that verified at least one drafted token
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_position: list[int]  # drafts accepted at position j
    acceptance_rate: float
    mean_acceptance_length: float  # tokens emitted per verified sequence-step (accepted drafts + 1)
    propose_seconds: float  # host time spent proposing


class EngineStats(msgspec.Struct, frozen=True):
    """Counters and gauges of one engine, as of when they were read."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_cache_tokens: int  # every tensor-parallel rank together
    kv_cache_bytes: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int  # engine steps taken (a step rate while serving vs idle shows host starvation)
    model_load_seconds: float
    tensor_parallel_size: int
    step_prefill_budget: int | None  # prompt tokens the latest step beside decodes could take (None: no latency budget)
    kernels: dict[str, object] | None  # the kernel backend's own account of its choices (free-form), if it keeps one
    spec_decode: SpecDecodeCounters | None = None  # None: speculative decoding is off


class EngineDescription(msgspec.Struct, frozen=True):
    """What is known of an engine only once it is built: the served context, the vocabulary the sampler
    draws from, and the start-up banner's facts."""

    max_model_len: int
    vocab_size: int
    device: str
    dtype: str
    kv_cache_dtype: str  # the paged KV cache's storage (engine/builder.kv_cache_dtype)
    kernels: str  # "torch" | "triton" | "cpu": the backend's describe()["backend"] ("none": a model without ops)
