"""The runner and its model in this process: forwards run here, decode graphs may be captured and replayed."""

from __future__ import annotations

import torch

from engine.executor.base import Executor
from engine.model_runner import StepInputs


class SingleProcessExecutor(Executor):
    def forward(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.forward(inputs)

    def warm_up(self, cuda_graphs: bool) -> None:
        self.runner.warm_up(self.runner.forward)
        if cuda_graphs:
            self.runner.capture_graphs()
