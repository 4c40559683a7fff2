"""Model forward passes over a paged KV cache: Llama family (Llama, Mistral, Qwen2, Phi-3) and gpt-oss.

`build_model(loaded, device, dtype, ops)` turns an opened checkpoint (engine.loader.LoadedModel,
safetensors or GGUF) into a CausalLM (engine.models.base); see docs/models.md.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from engine.models.base import CausalLM
from engine.models.decoder import DecoderLM
from engine.models.errors import ModelConfigError
from engine.models.gguf_names import gguf_renamer
from engine.models.gpt_oss import load_gpt_oss
from engine.models.llama import load_llama
from engine.models.spec import ModelSpec, parse_spec
from engine.models.weights import WeightReader

_LOADERS = {"llama": load_llama, "gpt_oss": load_gpt_oss}


def build_model(
    loaded: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: ModuleType | None = None,
) -> DecoderLM:
    """Validate `loaded.config`, read and check every tensor, and return the model on `device`.

    `loaded` needs `.config` (HF-style dict), `.tensors` (a TensorStore) and `.info.format`.
    Raises ModelConfigError naming the field or tensor when the checkpoint does not fit.
    """
    device = torch.device(device)
    if ops is None:
        from kernels import select_ops

        ops = select_ops(device)
    spec = parse_spec(loaded.config)
    from_gguf = loaded.info.format == "gguf"
    rename = gguf_renamer(spec.model_type) if from_gguf else (lambda name: name)
    reader = WeightReader(loaded.tensors, device, dtype, rename, unpack_mxfp4=unpack_mxfp4(device, dtype, ops, loaded))
    return _LOADERS[spec.family](spec, reader, ops, from_gguf)


# Dense copies of MXFP4 weights up to this size are kept when the ops would otherwise
# dequantize them again at every forward pass (the torch ops on CPU).
UNPACK_MXFP4_LIMIT_BYTES = 4 * 2**30


def unpack_mxfp4(device: torch.device, dtype: torch.dtype, ops: ModuleType, loaded: Any) -> bool:
    """Whether to dequantize MXFP4 weights once at load: small models, on ops with no packed fast path."""
    if device.type != "cpu" or not getattr(ops, "DEQUANTIZES_MXFP4_PER_CALL", False):
        return False
    parameters = getattr(loaded.info, "parameters", None)  # unknown: stay packed
    return parameters is not None and parameters * torch.empty(0, dtype=dtype).element_size() <= UNPACK_MXFP4_LIMIT_BYTES
