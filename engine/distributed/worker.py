"""The process each rank other than 0 runs: load its slice, join the group, then run every forward rank 0 sends."""

from __future__ import annotations

import logging
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine.distributed import step_inputs
from engine.distributed.context import ParallelContext
from engine.distributed.group import join_group, leave_group, rank_device, share_cores
from engine.distributed.shard import slice_layer, slice_vocab
from engine.loader.open import LoadedModel
from engine.models.decoder import DecoderLM

log = logging.getLogger(__name__)

READY = b"ready"


def load_slice(loaded: LoadedModel, ctx: ParallelContext, device: torch.device, dtype: torch.dtype,
               kernel_backend: str, unpack_mxfp4_gib: float) -> DecoderLM:
    """This rank's DecoderLM slice: each layer read whole on the CPU and cut at once (engine/distributed/shard),
    so the host holds one whole layer at a time, plus the whole embedding and LM head until they are cut."""
    from engine.models import build_model
    from kernels import select_ops

    ops = select_ops(device, kernel_backend)
    model = build_model(loaded, device="cpu", dtype=dtype, ops=ops,
                        unpack_mxfp4_gib=unpack_mxfp4_gib if device.type == "cpu" else 0.0,
                        place_layer=lambda layer: slice_layer(layer, ctx, device), keep_quantized=False)
    return slice_vocab(model, ctx, device)


def worker_main(rank: int, world_size: int, port: int, model_path: str | Path, device_type: str, dtype: torch.dtype,
                kernel_backend: str, unpack_mxfp4_gib: float, timeout_s: float, doorbell: Connection) -> None:
    """Serve forwards until rank 0 says STOP; any failure exits non-zero, which rank 0 sees as a broken group.

    `doorbell` is a pipe to rank 0: the worker reports READY on it once its slice is loaded, then,
    between steps, waits on it (rank 0 rings it before each command) as long as it takes; once
    rung, the collectives follow at once and their timeout applies. Rank 0 gone closes the
    doorbell, which ends the worker too.
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(message)s")
    try:
        from engine.loader import open_model

        device = rank_device(device_type, rank)
        ctx = ParallelContext(rank, world_size)
        share_cores(ctx, device)
        model = load_slice(open_model(model_path), ctx, device, dtype, kernel_backend, unpack_mxfp4_gib)
        doorbell.send_bytes(READY)  # rank 0 joins the group once every rank has loaded
        join_group(ctx, port, device, timeout_s)
        with torch.no_grad():
            while True:
                doorbell.recv_bytes()  # EOFError once rank 0 is gone
                command, fields = step_inputs.receive(device)
                if command == step_inputs.STOP:
                    break
                if command == step_inputs.KV_CACHE:
                    num_blocks, block_size = fields[:2]
                    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
                    model.bind_kv_caches([(torch.zeros(shape, dtype=model.kv_cache_dtype, device=device),
                                           torch.zeros(shape, dtype=model.kv_cache_dtype, device=device))
                                          for _ in range(model.num_layers)])
                    continue
                model.forward(*step_inputs.receive_step(fields, device))
    except EOFError:
        log.error("tensor-parallel rank 0 is gone; rank %d stops", rank)
        sys.exit(1)
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
        sys.exit(1)
    finally:
        leave_group()
