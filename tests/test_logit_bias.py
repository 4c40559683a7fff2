"""logit_bias on the logits' device against a plain torch reference, inside the sampler, and its rules."""

from __future__ import annotations

import pytest
import torch

from engine.logit_bias import apply_logit_bias, check_logit_bias
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import InvalidRequestError, SamplingParams
from test_sampler import DRAWS, VOCAB, _chi_square_p_value


def reference_bias(logits: torch.Tensor, biases: list[dict[int, float] | None]) -> torch.Tensor:
    out = logits.clone()
    for row, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            out[row, token] = out[row, token] + value
    return out


def test_batched_bias_matches_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    biases = [{3: 5.0, 7: -100.0}, None, {0: 0.5}, {15: 100.0, 3: -2.5, 4: 1.0}]
    biased = logits.clone()
    apply_logit_bias(biased, [SamplingParams(logit_bias=b) for b in biases])
    torch.testing.assert_close(biased, reference_bias(logits, biases), rtol=0, atol=0)


def test_draws_follow_the_biased_distribution():
    torch.manual_seed(1)
    logits = torch.randn(VOCAB)
    bias = {2: 1.5, 5: -1.0, 9: 2.0}
    params = SamplingParams(temperature=1.0, logit_bias=bias)
    result = Sampler(seed=3)(logits.expand(DRAWS, VOCAB).clone(), [SamplingRow(params)] * DRAWS)
    counts = torch.bincount(torch.tensor(result.token_ids), minlength=VOCAB)
    expected = reference_bias(logits[None], [bias])[0].softmax(-1)
    assert _chi_square_p_value(counts, expected) > 1e-3


def test_plus_and_minus_100_force_and_ban_only_their_rows():
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    best = int(logits[1].argmax())
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias={11: 100.0})),
            SamplingRow(SamplingParams(temperature=0, logit_bias={best: -100.0})),
            SamplingRow(SamplingParams(temperature=0))]
    tokens = Sampler()(logits.clone(), rows).token_ids
    assert tokens[0] == 11 and tokens[1] != best and tokens[2] == int(logits[2].argmax())


@pytest.mark.parametrize("bias, message", [({16: 1.0}, "out of range"), ({-1: 1.0}, "out of range"),
                                           ({3: 100.5}, "between -100 and 100"), ({3: -101}, "between")])
def test_ids_outside_the_vocabulary_and_biases_outside_the_range_are_refused(bias, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        check_logit_bias(bias, VOCAB)
    assert caught.value.param == "logit_bias"
