"""`Ops`: the op set every kernel backend exposes, as one typed contract.

`kernels.reference` (plain torch) and `kernels.triton_ops` (Triton) are modules that satisfy
this protocol; `select_ops` returns one of them and the models type their `ops` with it.
Each op's full contract (shapes, dtypes, numerics) is the docstring of its reference.
A backend may add trailing tuning parameters with defaults (Triton's split-K `num_splits`);
tests/test_kernels_ops.py holds every backend to these signatures.
"""

from __future__ import annotations

from typing import Protocol, overload

import torch

from kernels.cpu.quant import QuantizedWeight
from kernels.mxfp4 import MXFP4Tensor, SwizzledMXFP4

# A backend's MXFP4 weights are what its `prepare_weight` made of the checkpoint's MXFP4Tensor;
# GGUF-quantized weights are what its `quantized_weight` kept (the CPU backend's QuantizedWeight).
# Every op takes any of them and raises a TypeError for a layout another backend prepared.
Weight = torch.Tensor | MXFP4Tensor | SwizzledMXFP4 | QuantizedWeight


class Ops(Protocol):
    # Capability: packed MXFP4 weights are dequantized on every call, so a loader that can afford
    # one dense copy at load time should make it (the torch path); False where kernels read FP4 directly.
    DEQUANTIZES_MXFP4_PER_CALL: bool

    def describe(self) -> dict[str, object]:
        """What this backend runs on this machine, for the server's /v1/models metadata and start-up banner:
        at least {"backend": its kernel_backend name}."""

    def prepare_weight(self, weight: Weight) -> Weight:
        """The weight in the layout this backend's kernels read, made once at load (MXFP4 swizzled on Triton);
        any other weight is returned as it is."""

    def quantized_weight(self, raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
        """A GGUF tensor's stored blocks (`type_name`, logical `shape`) in a layout `linear` reads quantized,
        or None: the loader dequantizes it to a dense weight."""

    @overload
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: None = None) -> torch.Tensor: ...
    @overload
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm in fp32. With `residual`, normalises `x + residual` and also returns that sum."""

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
             mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """NeoX-style (rotate-half) rotary embedding on `[T, heads, head_dim]` q and k."""

    def write_kv_cache(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        """Scatter `[T, kv_heads, head_dim]` k/v into `[blocks, block_size, kv_heads, head_dim]` caches."""

    def rope_write_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                      inv_freq: torch.Tensor, mscale: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
        """`rope` on q and k, then `write_kv_cache` of the rotated k and v; returns the rotated q."""

    def paged_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                        scale: float, sliding_window: int | None = None, sinks: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """Causal attention of new queries `[T, heads, head_dim]` over each sequence's cached keys."""

    def linear(self, x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`x @ weight.T + bias` for a dense `[out, in]` or an MXFP4 weight."""

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """Llama's SwiGLU on a `[T, 2I]` tensor laid out as [gate | up]."""

    def swiglu_oss(self, gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
        """gpt-oss's clamped SwiGLU on a `[T, 2I]` tensor whose gate/up columns interleave."""

    def moe_route(self, router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token (ties to the lower id), then a softmax over those k logits."""

    def moe_experts(self, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                    w_gate_up: Weight, b_gate_up: torch.Tensor | None, w_down: Weight,
                    b_down: torch.Tensor | None, alpha: float = 1.702, limit: float = 7.0,
                    deterministic: bool = False) -> torch.Tensor:
        """Mixture of gpt-oss experts: `sum_k weight_k * down_e(swiglu_oss(gate_up_e(x)))`."""

    def moe(self, x: torch.Tensor, router_logits: torch.Tensor, top_k: int, w_gate_up: Weight,
            b_gate_up: torch.Tensor | None, w_down: Weight, b_down: torch.Tensor | None, alpha: float = 1.702,
            limit: float = 7.0, deterministic: bool = False) -> torch.Tensor:
        """`moe_experts` routed by `moe_route(router_logits, top_k)`: the whole gpt-oss MoE after its router."""
