"""The engine's composition root: an EngineConfig becomes an LLMEngine ready to step.

Every "auto" of the config is resolved here, once (`Placement`: device, dtype, kernel backend,
tensor-parallel size, then the sequence limit and async scheduling); the model is opened and
built (or split over its ranks), the KV pool sized and the context fitted to it, the runner
warmed up (CUDA graphs captured) and, on CPU, the kernel plan's int16 rows timed on the model and the
step budget (and with speculation the step cost) measured. LLMEngine only steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.cpu_kernel_plan import calibrate_int_dot
from engine.errors import ConfigError
from engine.cpu_threads import apply_cpu_threads
from engine.distributed.ranks import RankGroup, start_tensor_parallel
from engine.kv_budget import fit_context, kv_cache_blocks
from engine.executor import Executor, SingleProcessExecutor
from engine.llm_engine import EngineLayout, LLMEngine
from engine.model_runner import ModelRunner
from engine.models.base import CausalLM
from engine.scheduler import default_max_num_seqs
from engine.spec_decode.step_cost import measure as measure_step_cost
from engine.step_budget import measure as measure_step_budget
from engine.loader.model_info import ModelInfo
from engine.tokenizer import Tokenizer
from kernels.ops import Ops

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """A config's device: "auto" is CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class Placement:
    """Where and how the model computes, every "auto" resolved (the one reader of these four settings)."""

    device: torch.device
    dtype: torch.dtype
    kernel_backend: str  # cpu | torch | triton
    tensor_parallel_size: int

    @classmethod
    def resolve(cls, config: EngineConfig) -> "Placement":
        from kernels import resolve_backend

        device = resolve_device(config.device)
        default_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return cls(device, DTYPES.get(config.dtype, default_dtype), resolve_backend(device, config.kernel_backend),
                   config.tensor_parallel_size)


def kv_cache_dtype(config: EngineConfig, placement: Placement, head_dim: int) -> torch.dtype:
    """The paged KV cache's storage dtype (the one reader of `kv_cache_dtype`). "auto": fp16 where the CPU
    kernels read it in registers for this head size (kernels/cpu/layer_ops.cpp: fp32 activations, keys and
    values converted as loaded), since a step at long context re-reads the whole cache and fp16 halves its
    bytes (30 layers of SmolLM2 at 7,900 tokens, 1 thread: a decode's attention 50 -> 33 ms, an 8-token
    chunk's 93 -> 71 ms; bf16 measured no faster and keeps 3 fewer bits); else the model's dtype. A dtype
    other than the model's is for the single-process CPU backend only (the Triton kernels and the
    tensor-parallel ranks keep the model's)."""
    if config.kv_cache_dtype != "auto":
        chosen = DTYPES[config.kv_cache_dtype]
        if chosen != placement.dtype and (placement.kernel_backend != "cpu" or placement.tensor_parallel_size > 1):
            raise ConfigError(f"kv_cache_dtype {config.kv_cache_dtype} differs from the model's dtype "
                              f"{str(placement.dtype).removeprefix('torch.')}: only the CPU backend on one process "
                              "stores the KV cache in another dtype (use kv_cache_dtype auto)")
        return chosen
    if placement.kernel_backend == "cpu" and placement.dtype == torch.float32 and placement.tensor_parallel_size == 1:
        from kernels.cpu import extension

        native = extension.load()
        if native is not None and head_dim in native.flash_head_dims():
            return torch.float16
    return placement.dtype


def build_engine(config: EngineConfig, num_blocks: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> LLMEngine:
    """Open `config.model`, build it where `Placement` says and size the KV pool (or take `num_blocks`);
    `on_progress(read, total)` hears the weight bytes read while the model builds."""
    from engine.assets import resolve_model
    from engine.loader import open_model
    from engine.models import build_model
    from engine.tokenizer import load_tokenizer
    from kernels import select_ops

    started = time.perf_counter()
    path, builtin_name = resolve_model(config.model)
    loaded = open_model(path, builtin_name)
    thread_adapter = apply_cpu_threads(config.cpu_threads)  # before the first torch op starts OpenMP's pool
    placement = Placement.resolve(config)
    ops = select_ops(placement.device, placement.kernel_backend)
    ranks = None
    if placement.tensor_parallel_size > 1:
        ranks = start_tensor_parallel(loaded, path, placement.tensor_parallel_size, placement.device,
                                      placement.dtype, placement.kernel_backend, config.mxfp4_unpack_gib,
                                      config.tensor_parallel_timeout_s)
        model = ranks.local
    else:
        model = build_model(loaded, device=placement.device, dtype=placement.dtype, ops=ops,
                            unpack_mxfp4_gib=config.mxfp4_unpack_gib, on_progress=on_progress)
    model.kv_cache_dtype = kv_cache_dtype(config, placement, model.head_dim)
    log.info("KV cache dtype: %s (%s)", str(model.kv_cache_dtype).removeprefix("torch."),
             "kv_cache_dtype" if config.kv_cache_dtype != "auto" else "auto")
    context = loaded.info.context_length or 2048
    try:
        engine = engine_for_model(model, load_tokenizer(loaded), config, min(config.max_model_len or context, context),
                                  loaded.info, num_blocks, ops=ops, ranks=ranks)
    except Exception:
        if ranks is not None:
            ranks.stop(timeout_s=0.0)
        raise
    if placement.device.type == "cpu" and placement.tensor_parallel_size == 1:  # tensor parallel on CPU runs tests
        runner = engine.executor.runner
        calibrate_int_dot(runner, config.batched_tokens)  # first: the cost models below time these kernels
        if config.max_num_batched_tokens is None and config.enable_chunked_prefill:
            engine.step_budget = measure_step_budget(runner, config.batched_tokens)
            engine.scheduler.latency_budget = engine.step_budget
        if engine.spec is not None:
            engine.spec.step_cost = measure_step_cost(runner, config.batched_tokens)
    engine.thread_adapter = thread_adapter
    engine.load_seconds = time.perf_counter() - started
    return engine


def engine_for_model(model: CausalLM, tokenizer: Tokenizer, config: EngineConfig, max_model_len: int,
                     model_info: ModelInfo | None = None, num_blocks: int | None = None, *, ops: Ops | None = None,
                     ranks: RankGroup | None = None) -> LLMEngine:
    """An engine over a model already built (with tensor parallelism: `ranks.local`, rank 0's slice): the KV
    pool sized (or `num_blocks`), the context fitted to it, the executor made and, on CUDA, warmed up with
    its decode graphs captured."""
    device = model.device
    max_num_seqs = config.max_num_seqs or default_max_num_seqs(device)
    if num_blocks is None:
        num_blocks = kv_cache_blocks(model, config, max_model_len, max_num_seqs)
    max_model_len = fit_context(num_blocks, config.block_size, max_model_len,
                                explicit=config.max_model_len is not None)
    one_cuda_rank = device.type == "cuda" and ranks is None
    # A graph cannot hold the tensor-parallel broadcasts (headers built on the host): such engines run eagerly.
    cuda_graphs = one_cuda_rank and not config.enforce_eager
    runner = ModelRunner(model, num_blocks, config.block_size, max_num_seqs, config.batched_tokens, max_model_len,
                         pad_decodes=cuda_graphs, seed=config.seed)
    if ranks is None:
        executor: Executor = SingleProcessExecutor(runner, ops)
    else:
        from engine.executor.tensor_parallel import TensorParallelExecutor

        executor = TensorParallelExecutor(runner, ranks, ops)
    if device.type == "cuda":
        executor.warm_up(cuda_graphs)
    async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                        else one_cuda_rank and config.speculative_config is None)
    layout = EngineLayout(num_blocks, max_model_len, max_num_seqs, async_scheduling)
    return LLMEngine(executor, tokenizer, config, layout, model_info)
