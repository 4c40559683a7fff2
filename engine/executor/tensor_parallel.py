"""Rank 0 of a tensor-parallel group: its runner holds slice 0, and every forward is sent to every rank.

The engine (scheduler, KV block pool, sampler) runs on rank 0 only. Each forward rings every
worker's doorbell (a pipe: an idle worker waits there, not in a collective that would time out),
broadcasts the step's inputs (engine/distributed/step_inputs), and every rank computes its slice
over its own KV-cache shard; the collectives inside the forward return whole logits here. The
block pool's blocks are logical: block b is slot b in every rank's shard, so one block table serves all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from engine.distributed import step_inputs
from engine.errors import ParallelGroupError
from engine.distributed.ranks import RankGroup
from engine.executor.base import Executor
from engine.model_runner import ModelRunner, StepInputs
from kernels.ops import Ops

log = logging.getLogger(__name__)

T = TypeVar("T")


class TensorParallelExecutor(Executor):
    """`runner` runs over `ranks.local` (slice 0); the other ranks allocate the same KV blocks of their own heads."""

    def __init__(self, runner: ModelRunner, ranks: RankGroup, ops: Ops | None = None) -> None:
        super().__init__(runner, ops)
        self.ranks = ranks
        self.world_size = ranks.world_size
        self.failure: str | None = None
        self._collective(lambda: step_inputs.send_command(step_inputs.KV_CACHE, runner.num_blocks + 1,
                                                          runner.block_size, device=runner.device))

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        def step() -> torch.Tensor:
            step_inputs.send_step(inputs.input_ids, inputs.positions, inputs.metadata)
            return self.runner.forward(inputs)

        return self._collective(step)

    def warm_up(self, cuda_graphs: bool) -> None:
        """Every rank compiles the step shapes; no graphs (a graph cannot hold the host-built broadcasts)."""
        self.runner.warm_up(self.forward)

    def check_health(self) -> None:
        if self.failure is None:
            dead = [w for w in self.ranks.workers if not w.is_alive()]
            if dead:
                self.failure = f"tensor-parallel rank(s) exited (exit codes {[w.exitcode for w in dead]})"
        if self.failure is not None:
            raise ParallelGroupError(self.failure)

    def _collective(self, work: Callable[[], T]) -> T:
        """Ring the workers' doorbells, then run `work`; a dead rank or a timed-out collective becomes
        ParallelGroupError, and stays one."""
        self.check_health()
        try:
            for bell in self.ranks.doorbells:
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
        self.ranks.stop(timeout_s)
