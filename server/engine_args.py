"""Engine settings as command-line flags, shared by `minerva serve`, `chat` and `generate`.

Every EngineConfig field is a flag, named as vLLM names it where vLLM has one
(`--max-model-len`, `--gpu-memory-utilization`, ...). Precedence: a flag given on the
command line > the `--config` TOML's `[engine]` table > EngineConfig's default; so
every flag defaults to None ("not given") and the help text shows EngineConfig's default.
This module imports no torch: the parser is built for `minerva inspect` too.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from engine.config import CPU_KV_MEMORY_FRACTION, DEVICES, DTYPES, KERNEL_BACKENDS, KV_CACHE_DTYPES, EngineConfig
from engine.errors import MinervaError


class LaunchError(MinervaError):
    """The command line cannot be turned into served models; the message says why."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


# EngineConfig field -> (argparse keyword arguments, help). Booleans get --x / --no-x.
ENGINE_FLAGS: dict[str, tuple[dict[str, Any], str]] = {
    "device": ({"choices": DEVICES}, "where the model runs"),
    "dtype": ({"choices": DTYPES}, "weights and activations (auto: bf16 on CUDA, fp32 on CPU)"),
    "kv_cache_dtype": ({"choices": KV_CACHE_DTYPES},
                       "the KV cache's storage (auto: float16 on CPU where the native attention reads it, else dtype)"),
    "kernel_backend": ({"choices": KERNEL_BACKENDS}, "auto: Triton on CUDA, cpu (quantized GGUF matmuls) on CPU; torch: the plain reference"),
    "max_model_len": ({"type": positive_int, "metavar": "N"},
                      "longest prompt + completion in tokens (default: the model's context, or the longest "
                      "the KV cache holds)"),
    "max_num_seqs": ({"type": positive_int, "metavar": "N"},
                     "sequences running at once (default: by device, engine.scheduler.default_max_num_seqs)"),
    "max_num_batched_tokens": ({"type": positive_int, "metavar": "N"}, "tokens computed per engine step"),
    "block_size": ({"type": positive_int, "metavar": "N"}, "tokens per KV-cache block"),
    "gpu_memory_utilization": ({"type": float, "metavar": "FRACTION"},
                               "share of the GPU's memory for weights and KV cache (CUDA)"),
    "kv_cache_gib": ({"type": positive_float, "metavar": "GIB"},
                     f"KV-cache budget on CPU (default: {CPU_KV_MEMORY_FRACTION * 100:.0f}%% of available memory, "
                     "capped by what max_num_seqs full-context sequences can use)"),
    "enable_prefix_caching": ({"action": argparse.BooleanOptionalAction}, "reuse KV blocks of shared prompt prefixes"),
    "enable_chunked_prefill": ({"action": argparse.BooleanOptionalAction}, "split long prompts across steps"),
    "seed": ({"type": int, "metavar": "N"}, "engine-wide seed for requests without their own"),
    "tensor_parallel_size": ({"type": positive_int, "metavar": "N"},
                             "split the model over N GPUs (or N CPU processes) with torch.distributed"),
    "tensor_parallel_timeout_s": ({"type": positive_float, "metavar": "SECONDS"},
                                  "a collective waiting longer means a rank is gone: fail, never hang"),
    "enforce_eager": ({"action": "store_true"}, "CUDA: run every step eagerly (no CUDA graph capture or replay)"),
    "async_scheduling": ({"action": argparse.BooleanOptionalAction},
                         "launch each step before the previous step's tokens are read back, so host work overlaps "
                         "the device (default: on for one CUDA device; structured-output requests opt out)"),
    "speculative_config": ({"metavar": "JSON"},
                           "speculative decoding without a second model, in vLLM's shape: "
                           "'{\"method\": \"ngram\"|\"suffix\", \"num_speculative_tokens\": 5, ...}' "
                           "(engine/spec_decode/config.py lists the fields; needs synchronous scheduling)"),
    "mxfp4_unpack_gib": ({"type": float, "metavar": "GIB"},
                         "on CPU with the torch ops: dequantize MXFP4 experts once at load when the model fits "
                         "this many GiB dense (0: keep them packed)"),
    "cpu_threads": ({"type": positive_int, "metavar": "N"},
                    "threads for the model's CPU work (default: the CPUs this process may use, by affinity and "
                    "cgroup quota, less those other processes keep busy, re-read every second while it runs; "
                    "given, it stays fixed; engine/cpu_threads.py)"),
    "grammar_compile_timeout_s": ({"type": positive_float, "metavar": "SECONDS"},
                                  "a structured-output grammar compiling longer is killed and its request gets a 400"),
    "max_output_tokens": ({"type": positive_int, "metavar": "N"},
                          "cap on completion tokens per sample: larger max_tokens (or none) is served up to it and "
                          "ends with finish_reason length"),
    "grammar_cache_mib": ({"type": positive_float, "metavar": "MIB"}, "memory for cached compiled grammars"),
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The engine group: --config and one flag per EngineConfig setting, each defaulting to 'not given'."""
    group = parser.add_argument_group("engine (flag > --config file > default)")
    group.add_argument("--config", metavar="FILE", help="TOML file with an [engine] table (see configs/)")
    defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name, (options, text) in ENGINE_FLAGS.items():
        shown = defaults[name]
        suffix = "" if shown is None else f" (default: {str(shown).lower() if isinstance(shown, bool) else shown})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text + suffix, **options)


def engine_config(args: argparse.Namespace, model: str | None, served_model_name: str | None) -> EngineConfig:
    """One model's EngineConfig from the flags given, over `--config`, over the defaults (ConfigError if bad)."""
    overrides = {name: getattr(args, name) for name in ENGINE_FLAGS}
    overrides.update(model=model, served_model_name=served_model_name)
    given = {key: value for key, value in overrides.items() if value is not None}
    if args.config:
        return EngineConfig.from_toml(args.config, **given)
    return EngineConfig(**given)
