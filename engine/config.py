"""Engine settings and the TOML files in configs/ that preset them."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config file or setting is malformed; the message names the file and key."""


@dataclass
class EngineConfig:
    """Every knob of one served model; see README 'Config files'."""

    model: str | None = None  # path; None = the shipped default model
    served_model_name: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    kernel_backend: str = "auto"  # auto | torch | triton
    block_size: int = 16
    gpu_memory_utilization: float = 0.90  # fraction of free GPU memory for weights + KV cache
    kv_cache_gib: float = 0.25  # KV cache budget on CPU
    max_model_len: int | None = None  # None = the model's context length
    max_num_seqs: int | None = None  # None = by device (engine.scheduler.default_max_num_seqs)
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1  # ranks (GPUs, or CPU processes) one model is split over (engine/distributed)
    tensor_parallel_timeout_s: float = 30.0  # a collective waiting longer means a rank is gone: fail, never hang
    enforce_eager: bool = False  # CUDA: never capture or replay CUDA graphs
    mxfp4_unpack_gib: float = 4.0  # CPU torch ops: dense MXFP4 experts made once at load if the model fits (0 = packed)

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
                    "tensor_parallel_timeout_s")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.mxfp4_unpack_gib < 0:
            raise ConfigError(f"mxfp4_unpack_gib must be >= 0, got {self.mxfp4_unpack_gib}")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "EngineConfig":
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
