"""Executors run the model runner's forwards for LLMEngine, behind one interface (`Executor`).

- `single.SingleProcessExecutor`: the runner and its model in this process (CUDA graphs allowed);
- `tensor_parallel.TensorParallelExecutor`: rank 0 of a tensor-parallel group (engine/distributed):
  its runner holds slice 0, and each forward first sends its inputs to the other ranks.

The engine sees `execute(SchedulerOutput) -> StepResult` (its `output()` a RunnerOutput), `check_health`,
`shutdown` and what a stats line needs; it never asks which kind it holds.
"""

from engine.executor.base import Executor
from engine.executor.single import SingleProcessExecutor

__all__ = ["Executor", "SingleProcessExecutor"]
