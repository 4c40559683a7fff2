"""Starting and ending the torch.distributed process group every tensor-parallel rank joins."""

from __future__ import annotations

import datetime
import os
import socket

import torch

from engine.cpu_threads import allowed_cpus, cgroup_quota, usable_cpus
from engine.distributed.context import ParallelContext


def free_port() -> int:
    """A TCP port free on this host now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device_type: str, rank: int) -> torch.device:
    """One GPU per rank on CUDA; every rank on the CPU otherwise."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def join_group(ctx: ParallelContext, port: int, device: torch.device, timeout_s: float) -> None:
    """Join the group at 127.0.0.1:`port` as `ctx.rank`; joining and every later collective fail after
    `timeout_s` instead of waiting forever. Every rank loads its slice first, and rank 0 joins only
    once all workers reported theirs loaded (ranks.wait_until_loaded), so joining waits moments.

    NCCL only honours the timeout with blocking waits on (set here before the group exists).
    """
    import torch.distributed as dist

    if device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=f"tcp://127.0.0.1:{port}", rank=ctx.rank,
                            world_size=ctx.world_size, timeout=datetime.timedelta(seconds=timeout_s))


def share_cores(ctx: ParallelContext, device: torch.device) -> None:
    """CPU worker ranks split the host's cores instead of each oversubscribing all of them (rank 0, the
    server process, keeps torch's setting: other engines may share it)."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, usable_cpus(len(allowed_cpus()), cgroup_quota()) // ctx.world_size))


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
