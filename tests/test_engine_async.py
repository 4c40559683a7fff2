"""AsyncEngine: concurrent streams, cancellation aborts and frees blocks, the loop survives errors."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.outputs import RequestAccumulator
from engine.sampling_params import InvalidRequestError, SamplingParams
from tests.engine_testing import assert_idle, make_engine, reference_greedy


def test_concurrent_streams_and_cancel():
    async def main():
        engine = AsyncEngine(make_engine())
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("x", SamplingParams(), "early"):
                pass
        await engine.start()

        async def collect(prompt, rid, max_tokens=6):
            outs = [o async for o in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                             ignore_eos=True), rid)]
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
            merged = RequestAccumulator()
            for out in outs:
                merged.add(out)
            assert len(merged.samples()[0].token_ids) == max_tokens == outs[-1].outputs[0].num_generated
            return merged.result(rid)

        async def cancelled():
            async for _ in engine.generate("Hello there", SamplingParams(max_tokens=200), "gone"):
                break  # client leaves after the first chunk

        results = await asyncio.gather(collect("The quick brown", "a"), collect("Hello", "b"), cancelled())
        for out in results[:2]:
            assert out.outputs[0].token_ids == reference_greedy(tuple(out.prompt_token_ids), 6)
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate(list(range(300)), SamplingParams(), "big"):
                pass
        stats = engine.stats()
        assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
        assert stats["generation_tokens_total"] >= 12
        await engine.shutdown()
        assert_idle(engine.engine)

    asyncio.run(main())
