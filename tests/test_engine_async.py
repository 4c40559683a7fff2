"""AsyncEngine: concurrent streams, cancellation aborts and frees blocks, the loop survives errors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import EngineDeadError
from engine.outputs import RequestAccumulator
from engine.sampling_params import InvalidRequestError, SamplingParams
from tests.engine_testing import assert_idle, make_engine, reference_greedy
from tests.server_fixtures import wait_until_idle


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
        stats = wait_until_idle(engine)  # the abort of "gone" applies at the engine's next step boundary
        assert stats.num_running == 0 and stats.kv_blocks_used == 0
        assert stats.generation_tokens_total >= 12
        await engine.shutdown()
        assert_idle(engine.engine)

    asyncio.run(main())


def test_adds_and_aborts_do_not_wait_for_a_step():
    """While a forward is stuck, an abort returns and a new request is accepted at once; both apply after it."""
    async def main():
        engine = AsyncEngine(make_engine())
        inside, release = threading.Event(), threading.Event()
        forward = engine.engine.model.forward

        def held_forward(*args):
            inside.set()
            release.wait(timeout=30)
            return forward(*args)

        engine.engine.model.forward = held_forward
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        first = engine.generate("The quick brown", params, "a")
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.to_thread(inside.wait, 30)  # a step is in flight and cannot finish
        started = time.monotonic()
        await engine.abort("a")
        second = engine.generate("Hello", params, "b")
        pending = asyncio.ensure_future(second.__anext__())
        await asyncio.sleep(0.05)
        assert time.monotonic() - started < 1.0 and not pending.done()  # handed over, not waiting for the step
        release.set()
        assert (await waiting).request_id == "a"  # the step in flight still reports
        outs = [await pending] + [o async for o in second]
        assert outs[-1].finished and outs[-1].outputs[0].num_generated == 4
        assert wait_until_idle(engine).kv_blocks_used == 0  # "a" was aborted between steps
        await first.aclose()
        await engine.shutdown()

    asyncio.run(main())


def test_a_blocked_event_loop_does_not_stop_the_engine():
    """The engine thread keeps stepping while the event loop is busy (HTTP work cannot starve it)."""
    async def main():
        engine = AsyncEngine(make_engine())
        await engine.start()
        stream = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), "busy")
        first = await stream.__anext__()  # (several steps merged, if the loop came late)
        time.sleep(1.0)  # the event loop does nothing for a second
        assert engine.stats().generation_tokens_total > first.outputs[0].num_generated + 5
        outs = [o async for o in stream]
        assert outs[-1].finished
        await engine.shutdown()

    asyncio.run(main())


def test_an_engine_without_model_metadata_says_so():
    """The server reads model_info (model cards, templates, vocab checks); an engine built around a model
    object without one cannot give it, and says how to, instead of an AttributeError on None later."""
    from engine.builder import engine_for_model
    from engine.config import EngineConfig
    from tests.fake_model import FakeModel, IdTokenizer

    engine = engine_for_model(FakeModel(), IdTokenizer(), EngineConfig(), max_model_len=64, num_blocks=8)
    with pytest.raises(RuntimeError, match="no model metadata"):
        AsyncEngine(engine).model_info
