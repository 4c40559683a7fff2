"""A roofline estimate of decode throughput for a model on a device, from tensor headers only.

One decode step of a batch of B sequences, each with C tokens of context, must
(a) read every weight it touches and every sequence's KV cache from memory, and
(b) do the arithmetic. It can go no faster than the slower of the two:

    bytes(B, C) = dense_bytes + expert_bytes * f(B) + B * C * kv_bytes_per_token
    flops(B, C) = B * (2 * active_params + 4 * layers * C * heads * head_dim)
    step_time   = max(bytes / bandwidth, flops / compute)
    tokens/s    = B / step_time

f(B) = 1 - (1 - k/E)^B is the expected share of a MoE layer's E experts that a
batch of B tokens routes to (k experts each, independent uniform routing); it is
1 for dense models. The token-embedding table reads one row per token, so it is
left out unless it doubles as the output projection (tied embeddings).
Bandwidth and compute are sustained figures, not datasheet peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.loader import ModelInfo, open_model

EMBEDDING_NAMES = ("embed_tokens.weight", "token_embd.weight", "wte.weight")
OUTPUT_NAMES = ("lm_head.weight", "output.weight")
EXPERT_MARKERS = (".experts.", "_exps.")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    bandwidth_gb_s: float  # sustained memory bandwidth, GB/s
    tflops: float  # sustained dense bf16 (fp32 on CPU) TFLOP/s
    kv_bytes_per_value: int  # bf16 KV cache on GPUs, fp32 on CPU


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("NVIDIA H100 SXM 80GB", 3000.0, 800.0, 2),
    "h200": DeviceSpec("NVIDIA H200 141GB", 4300.0, 800.0, 2),
    "a100": DeviceSpec("NVIDIA A100 80GB", 1800.0, 250.0, 2),
    "l40s": DeviceSpec("NVIDIA L40S", 780.0, 300.0, 2),
    "rtx4090": DeviceSpec("NVIDIA GeForce RTX 4090", 900.0, 150.0, 2),
    "cpu": DeviceSpec("CPU (a typical server socket)", 50.0, 1.0, 4),
}


def device_key_for(name: str) -> str:
    """Table key for a torch device name such as 'NVIDIA H100 80GB HBM3'; unknown GPUs count as H100."""
    lowered = name.lower().replace(" ", "")
    for key in DEVICES:
        if key in lowered:
            return key
    return "cpu" if lowered == "cpu" else "h100"


@dataclass(frozen=True)
class WeightProfile:
    """How a model's stored bytes and parameters split between always-read weights and MoE experts."""

    dense_bytes: int
    expert_bytes: int
    dense_params: int
    expert_params: int

    @classmethod
    def of(cls, info: ModelInfo) -> "WeightProfile":
        tensors = open_model(info.path).tensors  # headers only
        names = set(tensors)
        tied = not any(name.endswith(OUTPUT_NAMES) for name in names)
        sums = {"dense_bytes": 0, "expert_bytes": 0, "dense_params": 0, "expert_params": 0}
        for name in names:
            tensor = tensors[name]
            if name.endswith(EMBEDDING_NAMES) and not tied:
                continue
            kind = "expert" if any(marker in name for marker in EXPERT_MARKERS) else "dense"
            sums[f"{kind}_bytes"] += tensor.nbytes
            sums[f"{kind}_params"] += logical_params(name, tensor.shape)
        return cls(**sums)


def logical_params(name: str, shape: tuple[int, ...]) -> int:
    """Stored MXFP4 `_blocks` hold two values per byte; their `_scales` are not parameters."""
    count = 1
    for dim in shape:
        count *= dim
    if name.endswith("_scales"):
        return 0
    return count * 2 if name.endswith("_blocks") else count


def estimate(info: ModelInfo, profile: WeightProfile, device: DeviceSpec, batch: int, context: int) -> dict[str, Any]:
    experts, active = info.experts or 0, info.active_experts or 0
    routed_share = 1.0 - (1.0 - active / experts) ** batch if experts and active else 1.0
    kv_per_token = info.layers * 2 * info.kv_heads * info.head_dim * device.kv_bytes_per_value
    step_bytes = profile.dense_bytes + profile.expert_bytes * routed_share + batch * context * kv_per_token
    active_params = profile.dense_params + profile.expert_params * (active / experts if experts and active else 1.0)
    attention_flops = 4 * info.layers * context * info.attention_heads * info.head_dim
    step_flops = batch * (2 * active_params + attention_flops)
    memory_s = step_bytes / (device.bandwidth_gb_s * 1e9)
    compute_s = step_flops / (device.tflops * 1e12)
    step_s = max(memory_s, compute_s)
    return {
        "device": device.name,
        "batch": batch,
        "context": context,
        "bytes_per_step": int(step_bytes),
        "flops_per_step": int(step_flops),
        "memory_time_ms": memory_s * 1e3,
        "compute_time_ms": compute_s * 1e3,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "tokens_per_second": batch / step_s,
        "tokens_per_second_per_sequence": 1.0 / step_s,
    }
