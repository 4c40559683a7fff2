"""How many KV blocks an engine gets, and the longest context they hold.

The budget: on CUDA the share of free memory `gpu_memory_utilization` leaves
(model_runner.num_kv_blocks); on CPU `kv_cache_gib` when set, else
CPU_KV_MEMORY_FRACTION of the memory available at start, never more than
`max_num_seqs` full-context sequences could ever use (a tiny model does not
zero gigabytes it cannot fill).

The context: a `max_model_len` the user asked for must fit one sequence in the
pool or start-up fails naming the settings that fix it; without one, the model's
own context is served when it fits, else the longest block-aligned context that
does, said in one log line (a 135M model's 8192 tokens must not need a config
file to start).
"""

from __future__ import annotations

import logging
import os

from engine.config import CPU_KV_MEMORY_FRACTION, EngineConfig
from engine.errors import ConfigError
from engine.model_runner import kv_bytes_per_block, num_kv_blocks
from engine.models.base import CausalLM

log = logging.getLogger(__name__)

FIX_HINT = ("raise kv_cache_gib (--kv-cache-gib, CPU) or gpu_memory_utilization (--gpu-memory-utilization, GPU), "
            "or lower max_model_len (--max-model-len)")


def available_memory_bytes() -> int:
    """Memory the OS can give without swapping: /proc/meminfo's MemAvailable, else free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_blocks(model: CausalLM, config: EngineConfig, max_model_len: int, max_num_seqs: int) -> int:
    """The pool size for `model` under `config`'s budget (see the module docstring)."""
    if config.kv_cache_gib is None and model.device.type == "cpu":
        per_block = kv_bytes_per_block(model, config.block_size)
        memory_blocks = int(CPU_KV_MEMORY_FRACTION * available_memory_bytes() // per_block)
        return min(memory_blocks, max_num_seqs * -(-max_model_len // config.block_size))
    return num_kv_blocks(model, config.block_size, config.kv_cache_gib or 0.0, config.gpu_memory_utilization)


def fit_context(num_blocks: int, block_size: int, wanted: int, explicit: bool) -> int:
    """The context length to serve: `wanted` if one sequence of it fits `num_blocks`; otherwise an error
    when the user asked for it (`explicit`), else the largest block-aligned length that fits."""
    needed = -(-wanted // block_size)
    if num_blocks >= needed:
        return wanted
    if explicit or num_blocks < 1:
        raise ConfigError(f"max_model_len {wanted} needs {needed} KV blocks of {block_size} tokens but the KV "
                          f"cache holds {num_blocks}: {FIX_HINT}")
    fitted = num_blocks * block_size
    log.warning("serving a context of %d tokens, not the model's %d: that is all the KV cache (%d blocks of %d "
                "tokens) holds; for more, raise --kv-cache-gib (CPU) or --gpu-memory-utilization (GPU)",
                fitted, wanted, num_blocks, block_size)
    return fitted
