"""Engine settings and the TOML files in configs/ that preset them."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ConfigError
from engine.spec_decode.config import SpeculativeConfig


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")  # auto: bf16 on CUDA, fp32 on CPU
KV_CACHE_DTYPES = DTYPES  # auto: fp16 where the CPU kernels read it (engine/builder.kv_cache_dtype), else dtype
KERNEL_BACKENDS = ("auto", "cpu", "torch", "triton")  # auto: Triton on CUDA, cpu (kernels/cpu_ops) on CPU
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
CPU_KV_MEMORY_FRACTION = 0.10  # the CPU KV budget without kv_cache_gib: this share of MemAvailable (kv_budget.py)


@dataclass
class EngineConfig:
    """Every knob of one served model; see README 'Config files'."""

    model: str | None = None  # path or built-in name (engine/assets); None = the default built-in model
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    kv_cache_dtype: str = "auto"  # the paged KV cache's storage: auto (engine/builder.kv_cache_dtype) | a DTYPES name
    kernel_backend: str = "auto"  # auto | cpu | torch | triton
    block_size: int = 16
    gpu_memory_utilization: float = 0.90  # fraction of free GPU memory for weights + KV cache
    kv_cache_gib: float | None = None  # KV cache budget on CPU; None = a share of available memory (kv_budget.py)
    max_model_len: int | None = None  # None = the model's context, or the longest the KV cache holds
    max_num_seqs: int | None = None  # None = by device (engine.scheduler.default_max_num_seqs)
    max_num_batched_tokens: int | None = None  # None = 2048; on CPU a latency-aware budget beside running streams
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) one model is split over (engine/distributed)
    tensor_parallel_timeout_s: float = 30.0  # a collective waiting longer means a rank is gone: fail, never hang
    enforce_eager: bool = False  # CUDA: never capture or replay CUDA graphs
    async_scheduling: bool | None = None  # launch step N+1 before reading step N's tokens; None = on CUDA, one rank
    mxfp4_unpack_gib: float = 4.0  # CPU torch ops: dense MXFP4 experts made once at load if the model fits (0 = packed)
    speculative_config: SpeculativeConfig | str | dict[str, Any] | None = None  # vLLM's JSON shape (text or table): parsed
    cpu_threads: int | None = None  # torch threads; None: usable CPUs less busy ones, followed (engine/cpu_threads.py)
    grammar_compile_timeout_s: float = 5.0  # a structured-output compile past this is killed: a 400 for its request
    max_output_tokens: int | None = None  # server-wide cap on one sample's completion tokens (None: the context)
    grammar_cache_mib: float = 256.0  # compiled grammars kept, in xgrammar's reported bytes

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                    "tensor_parallel_timeout_s", "cpu_threads", "grammar_compile_timeout_s", "grammar_cache_mib",
                    "max_output_tokens")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.mxfp4_unpack_gib < 0:
            raise ConfigError(f"mxfp4_unpack_gib must be >= 0, got {self.mxfp4_unpack_gib}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.speculative_config is not None:
            self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
            if self.async_scheduling:
                raise ConfigError("speculative decoding needs synchronous scheduling (its drafts extend the tokens "
                                  "the host has read back): drop async_scheduling or speculative_config")
        for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("kernel_backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def batched_tokens(self) -> int:
        """The most tokens one step computes."""
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "EngineConfig":
        """Read the `[engine]` table of a TOML file; keyword overrides win (e.g. from the CLI)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        table = data.get("engine", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [engine] must be a table")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown engine setting(s): {', '.join(unknown)}")
        table.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**table)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
