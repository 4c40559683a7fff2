"""engine/wire.py: every message between the API server and the engine core survives encode/decode unchanged."""

from __future__ import annotations

import msgspec
import pytest

from engine import wire
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.reports import EngineDescription, EngineStats, SpecDecodeCounters
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutput


def test_inputs_round_trip():
    params = SamplingParams(n=2, max_tokens=None, temperature=0.7, seed=2**64 - 1, stop=["\n"], stop_token_ids=[2],
                            logprobs=3, structured=StructuredOutput.from_schema({"type": "object"}),
                            logit_bias={5: -100.0, 7: 2.5}, prompt_logprobs=0)
    for message in (wire.AddRequest("r1", "Hello", SamplingParams()), wire.AddRequest("r2", [1, 2, 3], params),
                    wire.Abort(["r1", "r2"]), wire.ClientGone("api-1"), wire.Shutdown()):
        decoded = wire.decode_input(wire.encode(message))
        assert decoded == message and type(decoded) is type(message)
    assert wire.decode_input(wire.encode(wire.AddRequest("r", [1], params))).params.logit_bias == {5: -100.0, 7: 2.5}


def test_outputs_round_trip():
    logprob = TokenLogprob(9, "é", -0.25, [(9, "é", -0.25), (4, " a", -1.5)])
    output = RequestOutput("r", [1, 2], [CompletionOutput(0, "hé", [8, 9], [logprob, logprob], None, None, 2),
                                         CompletionOutput(1, "", [3], None, "stop", 3, 7)],
                           finished=False, num_cached_tokens=16, num_draft_tokens=4, num_accepted_tokens=3,
                           prompt_logprobs=[None, TokenLogprob(2, "b", -3.0, [], rank=5)])
    description = EngineDescription(max_model_len=2048, vocab_size=49152, device="cpu", dtype="float32",
                                    kv_cache_dtype="float16", kernels="cpu")
    stats = EngineStats(num_running=1, num_waiting=2, kv_blocks_total=10, kv_blocks_used=3, kv_blocks_free=7,
                        kv_cache_tokens=160, kv_cache_bytes=4096, prefix_cache_hit_rate=0.5, num_preemptions=1,
                        prompt_tokens_total=9, generation_tokens_total=12, steps_total=30, model_load_seconds=1.5,
                        tensor_parallel_size=1, step_prefill_budget=None, kernels={"quantized_matmul": {"kernel": "qgemm"}},
                        spec_decode=SpecDecodeCounters(num_drafts=2, num_draft_tokens=8, num_accepted_tokens=5,
                                                       accepted_per_position=[2, 2, 1, 0], acceptance_rate=0.625,
                                                       mean_acceptance_length=3.5, propose_seconds=0.01))
    for message in (wire.Outputs([output, output]), wire.Ready(description, stats), wire.Stats(stats),
                    wire.RequestFailed("r", "max_tokens too large", "max_tokens", None), wire.Fatal("rank 1 died"),
                    wire.LoadFailed("no such file")):
        decoded = wire.decode_output(wire.encode(message))
        assert decoded == message and type(decoded) is type(message)


def test_a_message_from_the_other_direction_is_refused():
    with pytest.raises(msgspec.ValidationError):
        wire.decode_input(wire.encode(wire.Fatal("x")))
    with pytest.raises(msgspec.ValidationError):
        wire.decode_output(wire.encode(wire.Abort(["r"])))
    assert wire.decode_hello(wire.encode(wire.Hello())) == wire.Hello()
