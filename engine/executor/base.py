"""`Executor`: what LLMEngine asks of whatever runs its forwards (one process or a tensor-parallel group)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.model_runner import ModelRunner, StepInputs, StepResult, kv_bytes_per_block
from engine.step_messages import SchedulerOutput
from kernels.ops import Ops


class Executor(ABC):
    """Runs `ModelRunner` steps on `world_size` ranks; rank 0's runner builds every step's inputs and samples here.

    `ops` is the kernel backend the builder chose (None for models that bring their own arithmetic,
    such as the tests' fakes); `kernels()` reports it.
    """

    world_size = 1

    def __init__(self, runner: ModelRunner, ops: Ops | None = None) -> None:
        self.runner = runner
        self.ops = ops

    @property
    def vocab_size(self) -> int:
        return self.runner.model.vocab_size

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def execute(self, step: SchedulerOutput) -> StepResult:
        """Run the step's forward and draw its tokens; the answer's ids stay on the device until
        `StepResult.output()` (see ModelRunner.prepare and ModelRunner.sample)."""
        return self.runner.sample(step, self.forward(self.runner.prepare(step)))

    @abstractmethod
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """One forward of prepared inputs on every rank; rank 0's logits."""

    @abstractmethod
    def warm_up(self, cuda_graphs: bool) -> None:
        """Compile the step shapes before traffic (CUDA), capturing decode graphs where the executor allows."""

    def check_health(self) -> None:
        """Raise engine.errors.ParallelGroupError when a step can no longer run; one process always can."""

    def shutdown(self) -> None:
        """Stop whatever the executor started (other ranks); one process has nothing to stop."""

    def kv_cache_bytes(self) -> int:
        """The KV cache of every rank together (each holds its heads' share of each block)."""
        return self.runner.num_blocks * kv_bytes_per_block(self.runner.model, self.runner.block_size) * self.world_size

    def kernels(self) -> dict[str, object] | None:
        """The kernel backend's own account of what it runs here (the CPU backend's measured choice)."""
        return self.ops.describe() if self.ops is not None else None
