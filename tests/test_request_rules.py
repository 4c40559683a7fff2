"""Each request rule lives once: sampling ranges in FIELD_BOUNDS (the engine enforces them, the
protocol declares them), prompt and budget rules in engine.prompt_rules."""

from __future__ import annotations

import pydantic
import pytest

from engine.prompt_rules import check_prompt_ids, completion_budget
from engine.sampling_params import FIELD_BOUNDS, InvalidRequestError, SamplingParams
from server.protocol import CompletionRequest


def edges(bounds: dict[str, float]) -> tuple[list[float], list[float]]:
    """Values just inside and just outside each bound."""
    step = {True: 1, False: 1e-3}
    inside, outside = [], []
    for kind, bound in bounds.items():
        delta = step[isinstance(bound, int)]
        pair = {"ge": (bound, bound - delta), "gt": (bound + delta, bound), "le": (bound, bound + delta)}[kind]
        inside.append(pair[0])
        outside.append(pair[1])
    return inside, outside


@pytest.mark.parametrize("name", sorted(set(FIELD_BOUNDS) & set(CompletionRequest.model_fields)))
def test_engine_and_protocol_agree_on_each_range(name):
    inside, outside = edges(FIELD_BOUNDS[name])
    for value in inside:
        SamplingParams(**{name: value, **({"max_tokens": None} if name == "min_tokens" else {})})
        CompletionRequest(prompt="x", **{name: value})
    for value in outside:
        with pytest.raises(InvalidRequestError) as err:
            SamplingParams(**{name: value})
        assert err.value.param == name
        with pytest.raises(pydantic.ValidationError):
            CompletionRequest(prompt="x", **{name: value})


def test_prompt_rules():
    check_prompt_ids([0, 9], 10)
    for ids in ([], [10], [-1]):
        with pytest.raises(InvalidRequestError) as err:
            check_prompt_ids(ids, 10)
        assert err.value.param == "prompt"
    assert completion_budget(3, None, 10) == 7 and completion_budget(3, 5, 10) == 5 and completion_budget(3, 50, 10) == 7
    with pytest.raises(InvalidRequestError) as err:
        completion_budget(10, 1, 10, param="messages")
    assert err.value.param == "messages" and err.value.code == "context_length_exceeded"
