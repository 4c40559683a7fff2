"""Tensor parallelism over torch.distributed: one model split across ranks (gloo on CPU, NCCL on GPUs).

- `context.ParallelContext`: this rank's place in the group and its collectives, passed to the model
  explicitly (like AttentionMetadata), a no-op for one rank;
- `shard`: cut each layer into this rank's slice as it loads (heads, MLP/expert width), then the vocabulary;
- `group`: start the process group with timeouts, so a dead rank is an error, never a hang;
- `step_inputs`: rank 0 broadcasts each step's flat inputs to the other ranks;
- `worker`: the process every other rank runs; `ranks.start_tensor_parallel`: rank 0 starts them and
  loads its own slice (a `RankGroup`), which engine/executor/tensor_parallel.py then drives, one forward at a time.

See docs/deploy.md (tensor parallelism) and docs/models.md.
"""
