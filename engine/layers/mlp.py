"""Feed-forward blocks: Llama's gated MLP and gpt-oss's routed mixture of experts."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels.ops import Ops, Weight


@dataclass
class GatedMLP:
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one `[2I, H]` weight ([gate | up] rows)."""

    gate_up: Weight
    down: Weight
    ops: Ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(self.ops.silu_and_mul(self.ops.linear(x, self.gate_up)), self.down)


@dataclass
class MoE:
    """gpt-oss MoE: router top-k with a softmax over the chosen logits, clamped-SwiGLU experts.

    Expert weights are `[E, out, in]`, dense or packed MXFP4 (dequantized tile by tile inside
    the matmul, never as a whole); `gate_up` rows interleave gate and up. A loader builds it
    with the checkpoint's layout (which tensor parallelism slices), then `for_kernels` once.
    """

    router: torch.Tensor  # [E, H]
    router_bias: torch.Tensor  # [E]
    gate_up: Weight  # [E, 2I, H]
    gate_up_bias: torch.Tensor  # [E, 2I]
    down: Weight  # [E, H, I]
    down_bias: torch.Tensor  # [E, H]
    top_k: int
    alpha: float
    limit: float
    ops: Ops

    def for_kernels(self) -> "MoE":
        """This MoE with its experts in the layout its ops read (MXFP4 swizzled for Triton's matmul)."""
        return replace(self, gate_up=self.ops.prepare_weight(self.gate_up), down=self.ops.prepare_weight(self.down))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(x, self.router, self.router_bias)
        return self.ops.moe(
            x, logits, self.top_k, self.gate_up, self.gate_up_bias, self.down, self.down_bias, self.alpha, self.limit
        )
