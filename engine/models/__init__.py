"""Model forward passes over a paged KV cache: Llama family (Llama, Mistral, Qwen2, Phi-3) and gpt-oss.

`build_model(loaded, device, dtype, ops)` turns an opened checkpoint (engine.loader.LoadedModel,
safetensors or GGUF) into a CausalLM (engine.models.base); see docs/models.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.loader.open import LoadedModel
from engine.models.base import CausalLM
from engine.models.decoder import DecoderLM, PlaceLayer, keep_layer
from engine.models.errors import ModelConfigError
from engine.models.gguf_names import gguf_renamer
from engine.models.gpt_oss import load_gpt_oss
from engine.models.llama import load_llama
from engine.models.spec import ModelSpec, parse_spec
from engine.models.weights import WeightReader
from kernels.ops import Ops

_LOADERS = {"llama": load_llama, "gpt_oss": load_gpt_oss}


def build_model(
    loaded: LoadedModel,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: Ops | None = None,
    unpack_mxfp4_gib: float = 0.0,
    on_progress: Callable[[int, int], None] | None = None,
    place_layer: PlaceLayer = keep_layer,
    keep_quantized: bool = True,
) -> DecoderLM:
    """Validate `loaded.config`, read and check every tensor, and return the model on `device`.

    `loaded` needs `.config` (HF-style dict), `.tensors` (a TensorStore) and `.info.format`.
    MXFP4 experts stay packed unless `unpack_mxfp4_gib` allows a dense copy (see unpack_mxfp4).
    `on_progress(read, total)` hears the bytes of weights read so far (a progress bar's feed).
    Each layer passes through `place_layer` as soon as it is built: tensor parallelism slices it
    there, so no more than one whole layer is ever held (engine/distributed); slicing cuts dense tensors,
    so it passes `keep_quantized=False` (otherwise GGUF-quantized weights stay quantized where `ops` read them so).
    Raises ModelConfigError naming the field or tensor when the checkpoint does not fit.
    """
    device = torch.device(device)
    if ops is None:
        from kernels import select_ops

        ops = select_ops(device)
    spec = parse_spec(loaded.config)
    from_gguf = loaded.info.format == "gguf"
    rename = gguf_renamer(spec.model_type) if from_gguf else (lambda name: name)
    unpack = unpack_mxfp4(device, dtype, ops, loaded, unpack_mxfp4_gib)
    reader = WeightReader(loaded.tensors, device, dtype, rename, unpack_mxfp4=unpack, on_progress=on_progress,
                          keep_quantized=ops.quantized_weight if keep_quantized else None)
    return _LOADERS[spec.family](spec, reader, ops, from_gguf, place_layer)


def unpack_mxfp4(device: torch.device, dtype: torch.dtype, ops: Ops, loaded: LoadedModel, limit_gib: float) -> bool:
    """Whether to dequantize MXFP4 experts once at load instead of at every call.

    Only for ops that have no packed fast path (the torch ops, which would dequantize
    every expert they touch at every step), on CPU, when the whole model in `dtype`
    fits `limit_gib` (as transformers does on devices without MXFP4 kernels). The
    dequantization is exact, so logits do not change; only memory is traded for speed.
    """
    if limit_gib <= 0 or device.type != "cpu" or not ops.DEQUANTIZES_MXFP4_PER_CALL:
        return False
    parameters = getattr(loaded.info, "parameters", None)  # unknown: stay packed
    return parameters is not None and parameters * dtype.itemsize <= limit_gib * 2**30
