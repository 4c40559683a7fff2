"""TensorParallelModel: rank 0's CausalLM. It starts the other ranks, holds slice 0, and drives every forward.

The engine (scheduler, KV block pool, sampler) runs on rank 0 only and sees one model: each
`forward` rings every worker's doorbell (a pipe: an idle worker waits there, not in a collective
that would time out), broadcasts the step's inputs, every rank computes its slice over its own KV-cache
shard, and the collectives inside the forward return whole logits here. The block pool's
blocks are logical: block b is slot b in every rank's shard, so one block table serves all.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import time
from multiprocessing.connection import Connection
from typing import Any

import torch

from engine.attention_metadata import AttentionMetadata
from engine.distributed import step_inputs
from engine.distributed.context import ParallelContext
from engine.distributed.group import ParallelGroupError, free_port, join_group, leave_group
from engine.distributed.worker import READY, load_slice, worker_main
from engine.models.decoder import DecoderLM
from engine.models.errors import ModelConfigError

log = logging.getLogger(__name__)

STARTUP_LIMIT_S = 1800.0  # loading a slice of the largest checkpoints from slow disks


class TensorParallelModel:
    """Implements engine.models.base.CausalLM over `world_size` processes; `num_kv_heads` is this rank's."""

    def __init__(self, local: DecoderLM, workers: list[multiprocessing.process.BaseProcess],
                 doorbells: list[Connection]) -> None:
        self.local = local
        self.workers = workers
        self.doorbells = doorbells
        self.parallel: ParallelContext = local.parallel
        self.world_size = self.parallel.world_size
        self.num_layers = local.num_layers
        self.num_kv_heads = local.num_kv_heads
        self.head_dim = local.head_dim
        self.vocab_size = local.vocab_size
        self.dtype = local.dtype
        self.device = local.device
        self.failure: str | None = None

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.local.kv_cache_dtype

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Bind slice 0's caches; every other rank allocates the same number of blocks of its own heads."""
        self.local.bind_kv_caches(kv_caches)
        num_blocks, block_size = kv_caches[0][0].shape[:2]
        self._collective(lambda: step_inputs.send_command(step_inputs.KV_CACHE, num_blocks, block_size,
                                                          device=self.device))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
                ) -> torch.Tensor:
        def step() -> torch.Tensor:
            step_inputs.send_step(input_ids, positions, attn_metadata)
            return self.local.forward(input_ids, positions, attn_metadata)

        return self._collective(step)

    __call__ = forward

    def _collective(self, work: Any) -> Any:
        """Ring the workers' doorbells, then run `work`; a dead rank or a timed-out collective becomes
        ParallelGroupError, and stays one."""
        if self.failure is None:
            dead = [w for w in self.workers if not w.is_alive()]
            if dead:
                self.failure = f"tensor-parallel rank(s) exited (exit codes {[w.exitcode for w in dead]})"
        if self.failure is not None:
            raise ParallelGroupError(self.failure)
        try:
            for bell in self.doorbells:
                bell.send_bytes(b"\x01")
            return work()
        except Exception as exc:  # a closed doorbell, or gloo/NCCL errors (DistBackendError, timeouts)
            self.failure = f"tensor-parallel group failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.failure)
            raise ParallelGroupError(self.failure) from exc

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (politely while the group works, by force otherwise) and leave the group."""
        if self.failure is None:
            try:
                self._collective(lambda: step_inputs.send_command(step_inputs.STOP, device=self.device))
            except ParallelGroupError as exc:
                log.warning("could not stop the tensor-parallel workers cleanly: %s", exc)
            self.failure = "the tensor-parallel group was shut down"
        for worker in self.workers:
            worker.join(timeout_s)
            if worker.is_alive():
                worker.kill()
                worker.join()
        for bell in self.doorbells:
            bell.close()
        self.doorbells = []
        leave_group()


def wait_until_loaded(workers: list[multiprocessing.process.BaseProcess], doorbells: list[Connection],
                      limit_s: float = STARTUP_LIMIT_S) -> None:
    """Block until every worker reports its slice loaded, so joining the group waits only moments.

    A worker that exits first is an error at once; one still loading after `limit_s` too.
    """
    deadline = time.monotonic() + limit_s
    for worker, bell in zip(workers, doorbells):
        while not bell.poll(0.2):
            if not worker.is_alive():
                raise ParallelGroupError(f"{worker.name} exited while loading (exit code {worker.exitcode})")
            if time.monotonic() > deadline:
                raise ParallelGroupError(f"{worker.name} did not load its slice within {limit_s:.0f} s")
        if bell.recv_bytes() != READY:
            raise ParallelGroupError(f"{worker.name} sent an unexpected start-up message")


def start_tensor_parallel(loaded: Any, model_path: str, world_size: int, device: torch.device, dtype: torch.dtype,
                          kernel_backend: str | None, unpack_mxfp4_gib: float, timeout_s: float
                          ) -> TensorParallelModel:
    """Spawn ranks 1..world_size-1, load slice 0 here, and join them; raises ParallelGroupError if they fail."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ParallelGroupError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
    port = free_port()
    spawn = mp.get_context("spawn")
    workers, doorbells = [], []
    for rank in range(1, world_size):
        mine, theirs = spawn.Pipe()
        worker = spawn.Process(target=worker_main, name=f"minerva-tp-rank-{rank}", daemon=True,
                               args=(rank, world_size, port, model_path, device.type, dtype, kernel_backend,
                                     unpack_mxfp4_gib, timeout_s, theirs))
        worker.start()
        theirs.close()  # the worker holds its end now
        workers.append(worker)
        doorbells.append(mine)
    ctx = ParallelContext(0, world_size)
    try:
        local = load_slice(loaded, ctx, device, dtype, kernel_backend, unpack_mxfp4_gib)
        wait_until_loaded(workers, doorbells)
        join_group(ctx, port, device, timeout_s)
    except Exception as exc:
        for worker in workers:
            worker.kill()
            worker.join()
        leave_group()
        if isinstance(exc, ModelConfigError):  # the model cannot be split this way: say so as it is
            raise
        raise ParallelGroupError(f"tensor-parallel group did not start: {type(exc).__name__}: {exc}") from exc
    return TensorParallelModel(local, workers, doorbells)
