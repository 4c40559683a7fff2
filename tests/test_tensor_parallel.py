"""Tensor parallelism on the CPU with gloo: two spawned ranks give the same greedy tokens and fp32 logits
as one process, for Llama with fewer KV heads than ranks (replicated) and as many (split), and for gpt-oss
with MXFP4 experts, sinks and a sliding window; exactly two all-reduces per layer; the sharding rules.

The served path (`minerva serve --tensor-parallel-size 2`, the openai client, a killed rank) is in
tests/test_tensor_parallel_serve.py.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.distributed.context import ParallelContext
from engine.distributed.shard import HeadSlice, head_slice, width_slice
from engine.builder import build_engine
from engine.models.errors import ModelConfigError
from engine.sampling_params import SamplingParams
from kernels.mxfp4 import BLOCK
from tests.engine_testing import assert_idle, run_to_completion
from tests.tp_fixtures import save_tp_model

PROMPTS = ([3, 17, 29], [5, 9, 40, 41, 42, 43, 44, 45, 46], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])


def generate(model_dir, tp: int) -> tuple[dict[str, list[int]], list[torch.Tensor], dict[str, int], dict]:
    """Greedy outputs, every step's logits, collectives per forward and stats: three prompts decoded together
    with chunked prefill (8-token budget), so steps mix prefill chunks and decodes over 4-token blocks."""
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", kernel_backend="torch",
                          tensor_parallel_size=tp, block_size=4, max_num_batched_tokens=8, mxfp4_unpack_gib=0,
                          max_model_len=64)
    engine = build_engine(config, num_blocks=48)
    logits: list[torch.Tensor] = []
    forward = engine.executor.forward

    def capture(inputs):
        out = forward(inputs)
        logits.append(out.clone())
        return out

    engine.executor.forward = capture
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        finals = run_to_completion(engine)
        assert_idle(engine)
        counts = engine.model.parallel.counts
        per_forward = {name: count / len(logits) for name, count in counts.items()}
        return ({rid: out.outputs[0].token_ids for rid, out in finals.items()}, logits, per_forward,
                engine.stats())
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["llama-kv1", "llama-kv2", "gpt-oss-mxfp4"])
def test_two_ranks_match_one(kind, tmp_path_factory):
    model_dir, layers = save_tp_model(kind, tmp_path_factory.mktemp(kind))
    tokens_1, logits_1, _, stats_1 = generate(model_dir, 1)
    tokens_2, logits_2, per_forward, stats_2 = generate(model_dir, 2)
    assert tokens_2 == tokens_1
    assert len(logits_2) == len(logits_1)
    for one, two in zip(logits_1, logits_2):
        torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4)  # fp32, sums in another order
    # the row-parallel joins (attention out, MLP/MoE down) per layer, plus the vocab-parallel embedding
    assert per_forward == {"all_reduce": 2 * layers + 1, "all_gather": 1}
    assert stats_2.tensor_parallel_size == 2 and stats_2.kv_cache_tokens == stats_1.kv_cache_tokens
    replicated = kind == "llama-kv1"  # one KV head, so each rank keeps a copy: twice the bytes
    assert stats_2.kv_cache_bytes == stats_1.kv_cache_bytes * (2 if replicated else 1)


def test_head_slices_split_or_replicate_kv_heads():
    ranks = [ParallelContext(rank, 2) for rank in range(2)]
    assert [head_slice(8, 4, ctx) for ctx in ranks] == [HeadSlice(0, 4, 0, 2), HeadSlice(4, 4, 2, 2)]
    one_kv = [head_slice(4, 1, ctx) for ctx in ranks]
    assert [(s.q_begin, s.q_count, s.kv_begin, s.kv_count) for s in one_kv] == [(0, 2, 0, 1), (2, 2, 0, 1)]
    four = [head_slice(8, 2, ParallelContext(rank, 4)) for rank in range(4)]
    assert [(s.q_begin, s.kv_begin, s.kv_count) for s in four] == [(0, 0, 1), (2, 0, 1), (4, 1, 1), (6, 1, 1)]
    with pytest.raises(ModelConfigError, match="attention heads"):
        head_slice(6, 2, ParallelContext(0, 4))
    with pytest.raises(ModelConfigError, match="KV heads"):
        head_slice(12, 3, ParallelContext(0, 2))


def test_widths_split_evenly_and_mxfp4_only_between_blocks():
    assert width_slice(128, ParallelContext(1, 2), "x") == slice(64, 128)
    assert width_slice(2 * BLOCK, ParallelContext(1, 2), "x", BLOCK) == slice(BLOCK, 2 * BLOCK)
    with pytest.raises(ModelConfigError, match="multiple of 32"):
        width_slice(96, ParallelContext(0, 2), "the expert intermediate_size", BLOCK)  # 48 per rank
    with pytest.raises(ModelConfigError, match="intermediate_size"):
        width_slice(30, ParallelContext(0, 4), "intermediate_size")


def test_vocab_ranges_cover_the_vocabulary_once():
    for vocab, ranks in ((282, 2), (281, 2), (10, 4)):
        ranges = [ParallelContext(rank, ranks).vocab_range(vocab) for rank in range(ranks)]
        assert ranges[0][0] == 0 and ranges[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_one_rank_runs_no_collective():
    ctx = ParallelContext()
    x = torch.randn(3, 4)
    assert ctx.all_reduce(x) is x and ctx.gather_vocab(x, 4) is x
    table = torch.randn(10, 4)
    assert torch.equal(ctx.embed(table, torch.tensor([1, 9]), 10), table[[1, 9]])
    assert not ctx.counts


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_two_gpus_match_one(tmp_path):
    """The GPU row: NCCL between two cards, bf16 weights, the same greedy tokens as one card."""
    model_dir, _ = save_tp_model("gpt-oss-mxfp4", tmp_path / "gpt-oss")
    outputs = {}
    for tp in (1, 2):
        config = EngineConfig(model=str(model_dir), device="cuda", tensor_parallel_size=tp, max_model_len=64)
        engine = build_engine(config, num_blocks=48)
        try:
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
            outputs[tp] = {rid: out.outputs[0].token_ids for rid, out in run_to_completion(engine).items()}
        finally:
            engine.close()
    assert outputs[2] == outputs[1]


def test_build_model_hands_each_layer_to_place_layer_as_it_is_built(tmp_path):
    """The hook tensor parallelism slices through: called once per layer, in order, its result kept."""
    from engine.loader import open_model
    from engine.models import build_model

    model_dir, layers = save_tp_model("gpt-oss-mxfp4", tmp_path / "gpt-oss")
    seen = []

    def place(layer):
        seen.append(layer)
        return layer

    model = build_model(open_model(str(model_dir)), place_layer=place)
    assert len(seen) == layers and all(a is b for a, b in zip(model.layers, seen))


def test_slicing_refuses_a_weight_kept_quantized():
    """Ranks load dense weights (build_model(keep_quantized=False)); a packed GGUF weight has no rows to cut
    like a tensor's, so a layer holding one is refused by name instead of failing inside torch."""
    from engine.distributed.shard import slice_layer
    from engine.layers.attention import AttentionWeights, PagedAttention
    from engine.layers.mlp import GatedMLP
    from engine.layers.rotary import Rotary
    from engine.models.decoder import DecoderLayer
    from kernels import reference
    from kernels.cpu.quant import QuantizedWeight

    hidden, heads, head_dim, width = 8, 2, 4, 32
    attention = PagedAttention(AttentionWeights(qkv=torch.zeros(3 * heads * head_dim, hidden),
                                                o=torch.zeros(hidden, heads * head_dim)),
                               heads, heads, head_dim, Rotary(torch.ones(head_dim // 2)), None, reference)
    packed = QuantizedWeight("q8", torch.zeros(2 * width, hidden, dtype=torch.int8), torch.ones(2 * width, 1),
                             torch.empty(0), torch.empty(0), "Q8_0")
    layer = DecoderLayer(torch.ones(hidden), attention, torch.ones(hidden),
                         GatedMLP(gate_up=packed, down=torch.zeros(hidden, width), ops=reference))
    with pytest.raises(ModelConfigError, match="slices dense weights, not QuantizedWeight"):
        slice_layer(layer, ParallelContext(0, 2), torch.device("cpu"))
