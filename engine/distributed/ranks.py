"""Starting a tensor-parallel group from rank 0: spawn ranks 1..n-1, load slice 0 here, join them.

engine/executor/tensor_parallel.py drives the group once it runs.
"""

from __future__ import annotations

import multiprocessing.process
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine.distributed.context import ParallelContext
from engine.distributed.group import free_port, join_group, leave_group
from engine.errors import ParallelGroupError
from engine.distributed.worker import READY, load_slice, worker_main
from engine.loader.open import LoadedModel
from engine.models.decoder import DecoderLM
from engine.models.errors import ModelConfigError

STARTUP_LIMIT_S = 1800.0  # loading a slice of the largest checkpoints from slow disks


@dataclass
class RankGroup:
    """The ranks rank 0 started: its own slice (`local`), the other ranks' processes and their doorbells."""

    local: DecoderLM
    workers: list[multiprocessing.process.BaseProcess]
    doorbells: list[Connection]

    @property
    def world_size(self) -> int:
        return self.local.parallel.world_size

    def stop(self, timeout_s: float) -> None:
        """Wait for the workers to exit (killing those that do not within `timeout_s`) and leave the group."""
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


def start_tensor_parallel(loaded: LoadedModel, model_path: str | Path, world_size: int, device: torch.device, dtype: torch.dtype,
                          kernel_backend: str, unpack_mxfp4_gib: float, timeout_s: float
                          ) -> RankGroup:
    """Spawn ranks 1..world_size-1, load slice 0 here, and join them; raises ParallelGroupError if they fail."""
    import torch.multiprocessing as mp

    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ParallelGroupError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                                 f"{torch.cuda.device_count()} visible")
    port = free_port()
    spawn = mp.get_context("spawn")
    workers: list[multiprocessing.process.BaseProcess] = []
    doorbells: list[Connection] = []
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
        for started in workers:
            started.kill()
            started.join()
        leave_group()
        if isinstance(exc, ModelConfigError):  # the model cannot be split this way: say so as it is
            raise
        raise ParallelGroupError(f"tensor-parallel group did not start: {type(exc).__name__}: {exc}") from exc
    return RankGroup(local, workers, doorbells)
