"""engine/request_streams.py: a stream that falls behind takes its outputs merged, and loses nothing."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest

from engine.errors import EngineDeadError
from engine.outputs import CompletionOutput, RequestAccumulator, RequestOutput, TokenLogprob
from engine.request_streams import OutputSlot


def deltas(seed: int) -> list[RequestOutput]:
    """A two-sample request's deltas over a few steps (samples change on some steps only, finish apart)."""
    rng = random.Random(seed)
    outputs, generated = [], [0, 0]
    steps = rng.randint(1, 8)
    for step in range(steps):
        changed = []
        for index in range(2):
            if rng.random() < 0.7 or step == steps - 1:
                ids = [rng.randrange(100) for _ in range(rng.randint(1, 3))]
                generated[index] += len(ids)
                logprobs = [TokenLogprob(i, f"t{i}", -rng.random()) for i in ids]
                last = step == steps - 1
                changed.append(CompletionOutput(index, "".join(f"t{i}" for i in ids), ids, logprobs,
                                                "length" if last else None, None, generated[index]))
        outputs.append(RequestOutput("r", [1, 2, 3], changed, step == steps - 1, num_cached_tokens=step,
                                     num_draft_tokens=step, num_accepted_tokens=step))
    return outputs


@pytest.mark.parametrize("seed", range(40))
def test_merged_deltas_accumulate_to_the_same_completion(seed):
    steps = deltas(seed)
    whole = RequestAccumulator()
    for output in copy.deepcopy(steps):
        whole.add(output)
    rng = random.Random(seed)

    async def consume() -> RequestAccumulator:
        slot, merged, taken = OutputSlot(), RequestAccumulator(), []
        for output in steps:  # the engine delivers; the stream takes at random moments
            slot.put(output)
            if rng.random() < 0.4:
                taken.append(await slot.get())
        if not taken or taken[-1].finished is False:
            taken.append(await slot.get())
        for output in taken:
            merged.add(output)
        assert len(taken) <= len(steps) and taken[-1].finished
        return merged

    merged = asyncio.run(consume())
    assert merged.result("r") == whole.result("r")


def test_an_error_comes_after_the_output_before_it():
    async def main():
        slot = OutputSlot()
        slot.put(deltas(1)[0])
        slot.put(EngineDeadError("gone"))
        assert isinstance(await slot.get(), RequestOutput)
        with pytest.raises(EngineDeadError):
            await slot.get()

    asyncio.run(main())
