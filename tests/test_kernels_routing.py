"""The one-launch MoE routing kernel against its torch reference (kernels.routing), and the MoE
built on it (routing inside, combine in the down projection's epilogue) against kernels.reference."""

from __future__ import annotations

import pytest
import torch

from kernel_testing import DEVICES, assert_close, interpreter, poisoned_outputs  # noqa: F401
from kernels import mxfp4, reference, routing, triton_ops
from kernels.triton import mxfp4_matmul
from kernels.triton import routing as triton_routing


def _assert_same_routing(got: routing.Routing, want: routing.Routing) -> None:
    torch.testing.assert_close(got.expert_ids.cpu(), want.expert_ids.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got.expert_weights.cpu(), want.expert_weights.cpu(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.row_pair.cpu(), want.row_pair.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got.row_weight.cpu(), want.row_weight.cpu(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.tile_expert.cpu(), want.tile_expert.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got.tile_start.cpu(), want.tile_start.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(got.expert_end.cpu(), want.expert_end.cpu(), rtol=0, atol=0)


def _logits(case: str, tokens: int, experts: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(tokens * 31 + experts)
    if case == "random":
        x = torch.randn(tokens, experts, generator=g)
        x[:, experts // 2 :] -= 6  # the upper experts get few or no rows
    elif case == "ties":  # few distinct values: equal logits inside and across the top k
        x = torch.randint(0, 3, (tokens, experts), generator=g).float()
    else:  # "one expert": every token's largest logit is expert 1's
        x = torch.randn(tokens, experts, generator=g)
        x[:, 1] = 10
    return x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["random", "ties", "one expert"])
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 4, 2, 16), (37, 8, 3, 4), (70, 6, 1, 16), (9, 5, 5, 2)])
@pytest.mark.parametrize("block_t", [None, 16, 2])  # one launch of one chunk, of up to 4 chunks; two launches
def test_routing_from_logits(device, case, tokens, experts, top_k, block_m, block_t):
    logits = _logits(case, tokens, experts, device)
    zero = torch.full((tokens, 5), float("nan"), device=device)
    got = triton_routing.route(top_k, experts, block_m, router_logits=logits, zero=zero, block_t=block_t)
    weights, ids = reference.moe_route(logits, top_k)
    _assert_same_routing(got, routing.route(ids, weights, experts, block_m))
    assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("device", DEVICES)
def test_routing_from_chosen_experts_and_bf16_logits(device):
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3]], device=device)
    weights = torch.rand(4, 2, device=device)
    for block_t in (None, 2):
        got = triton_routing.route(2, 6, 2, expert_ids=ids, expert_weights=weights, block_t=block_t)
        _assert_same_routing(got, routing.route(ids, weights, 6, 2))
    logits = torch.randn(5, 32, device=device).to(torch.bfloat16)
    got = triton_routing.route(4, 32, 16, router_logits=logits)
    w, i = reference.moe_route(logits, 4)
    _assert_same_routing(got, routing.route(i, w, 32, 16))


def test_routing_reference_layout():
    """The contract on a hand-checked case: 3 tokens, top-2 of 4 experts, tiles of 2 rows."""
    ids = torch.tensor([[2, 0], [0, 2], [2, 3]])
    r = routing.route(ids, torch.arange(6.0).view(3, 2), 4, 2)
    assert r.row_pair.tolist() == [1, 2, 0, 3, 4, 5]  # expert 0: pairs 1, 2; expert 2: 0, 3, 4; expert 3: 5
    assert r.row_weight.tolist() == [1.0, 2.0, 0.0, 3.0, 4.0, 5.0]
    assert r.expert_end.tolist() == [2, 2, 5, 6]
    assert r.tile_expert.tolist() == [0, 2, 2, 3, 4, 4, 4]  # max_tiles = 6 // 2 + min(4, 6)
    assert r.tile_start.tolist()[:4] == [0, 2, 4, 5]


def _moe_weights(experts, hidden, inter, device, dtype):
    w_gate_up = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden)).to(device)
    w_down = mxfp4.quantize(torch.randn(experts, hidden, inter)).to(device)
    b_gate_up = torch.randn(experts, 2 * inter, device=device).to(dtype)
    b_down = torch.randn(experts, hidden, device=device).to(dtype)
    return w_gate_up, b_gate_up, w_down, b_down


def _swizzled(weights):
    """The MoE weights as the Triton backend prepares them at load (the reference reads the checkpoint's)."""
    w_gate_up, b_gate_up, w_down, b_down = weights
    return triton_ops.prepare_weight(w_gate_up), b_gate_up, triton_ops.prepare_weight(w_down), b_down


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", ["random", "ties", "one expert"])
def test_moe_routes_inside(device, dtype, deterministic, case):
    # K of gate_up 160 = a full swizzled block of 128 + 32; K of down 96 = blocks of 64 + 32.
    tokens, experts, top_k, hidden, inter = 11, 6, 2, 160, 96
    x = (torch.randn(tokens, hidden, device=device) * 0.5).to(dtype)
    logits = _logits(case, tokens, experts, device)
    w = _moe_weights(experts, hidden, inter, device, dtype)
    got = triton_ops.moe(x, logits, top_k, *_swizzled(w), 1.702, 7.0, deterministic)
    assert_close(got, reference.moe(x, logits, top_k, *w))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_moe_repeats_bit_for_bit(device):
    x = torch.randn(9, 64, device=device)
    logits = torch.randn(9, 4, device=device)
    w = _swizzled(_moe_weights(4, 64, 32, device, torch.float32))
    first = triton_ops.moe(x, logits, 2, *w, deterministic=True)
    assert torch.equal(first, triton_ops.moe(x, logits, 2, *w, deterministic=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_partials_add_up(device, splits):
    """Split-K (each split's partial added atomically, bias once) equals the reference linear."""
    m, n, k = 5, 48, 544  # 4 full K blocks and a remainder of 32 (taken by the last split)
    weight = mxfp4.quantize(torch.randn(n, k)).to(device)
    bias = torch.randn(n, device=device)
    x = torch.randn(m, k, device=device)
    out = torch.zeros(m, n, device=device)
    tiles = mxfp4.swizzle(weight)
    parts = (tiles.blocks.view(1, -1), tiles.scales.view(1, -1))
    mxfp4_matmul.launch(x, parts, bias.view(1, n), out, n, k, 1, atomic_add=True, num_splits=splits)
    assert_close(out, reference.linear(x, weight, bias))


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top-5 of 4"):
        triton_routing.route(5, 4, 16, router_logits=torch.randn(3, 4))


@pytest.mark.parametrize("given", [{}, {"expert_ids": torch.zeros(3, 2, dtype=torch.int32)}])
def test_route_without_logits_or_a_whole_choice_names_what_it_needs(given):
    with pytest.raises(ValueError, match="give router_logits, or expert_ids and expert_weights"):
        triton_routing.route(2, 4, 16, **given)


@pytest.mark.parametrize("device", DEVICES)
def test_routing_with_more_chunks_than_one_count_block(device):
    # 70 one-token chunks: the placing programs sum the chunk counts over two blocks of 64.
    logits = _logits("random", 70, 4, device)
    got = triton_routing.route(2, 4, 8, router_logits=logits, block_t=1)
    weights, ids = reference.moe_route(logits, 2)
    _assert_same_routing(got, routing.route(ids, weights, 4, 8))
