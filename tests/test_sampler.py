"""Sampler against plain-torch references, one parameter at a time."""

from __future__ import annotations

import torch

from engine.sampler import Sampler, SamplingRow, apply_penalties, filter_logits
from engine.sampling_params import SamplingParams

VOCAB = 50


def _row(**kw) -> SamplingRow:
    prompt = kw.pop("prompt", [1, 2, 3])
    out = kw.pop("out", [])
    return SamplingRow(SamplingParams(**kw), prompt, out)


def test_greedy_is_argmax():
    logits = torch.randn(4, VOCAB)
    result = Sampler()(logits.clone(), [_row(temperature=0)] * 4)
    assert result.token_ids == logits.argmax(-1).tolist()


def test_penalties_match_reference():
    logits = torch.randn(1, VOCAB)
    prompt, out = [1, 2, 3], [3, 4, 4, 5]
    row = _row(prompt=prompt, out=out, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    got = logits.clone()
    apply_penalties(got, [row])
    want = logits.clone()[0]
    for t in set(prompt + out):
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t in set(out):
        want[t] -= 0.25 * out.count(t) + 0.5
    torch.testing.assert_close(got[0], want)


def test_filters_match_reference():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    got = filter_logits(logits, torch.tensor([5, 0, 0]), torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0.0, 0.0, 0.3]))
    # top-k: exactly the 5 largest survive
    assert set(torch.nonzero(got[0].isfinite()).flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    # top-p: the smallest prefix of sorted tokens whose mass reaches 0.7
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True)
    keep = int((probs[order].cumsum(0) < 0.7).sum()) + 1
    assert set(torch.nonzero(got[1].isfinite()).flatten().tolist()) == set(order[:keep].tolist())
    # min-p: tokens with prob >= 0.3 * max prob
    probs = logits[2].softmax(-1)
    assert set(torch.nonzero(got[2].isfinite()).flatten().tolist()) == set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())


def test_sampling_frequencies_follow_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(seed=3)
    draws = torch.tensor([sampler(logits.clone(), [_row(temperature=0.7)]).token_ids[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, (logits[0] / 0.7).softmax(-1), atol=0.03, rtol=0)


def test_seed_is_batch_independent():
    logits = torch.randn(3, VOCAB)
    def draw(batch_rows, index):
        rows = [SamplingRow(SamplingParams(temperature=1.0, seed=s), [], [],
                            torch.Generator().manual_seed(s) if s is not None else None) for s in batch_rows]
        return Sampler(seed=index)(logits[: len(rows)].clone() if len(rows) == 3 else logits[[2]].clone(), rows).token_ids[-1]
    assert draw([None, None, 11], 1) == draw([11], 2)


def test_logprobs_and_min_tokens_ban():
    logits = torch.randn(1, VOCAB)
    banned = int(logits.argmax())
    row = SamplingRow(SamplingParams(temperature=0, logprobs=3), [], [], None, [banned])
    result = Sampler()(logits.clone(), [row])
    masked = logits.clone()
    masked[0, banned] = float("-inf")
    ref = masked.log_softmax(-1)[0]
    assert result.token_ids[0] == int(masked.argmax())
    assert abs(result.logprobs[0] - float(ref[result.token_ids[0]])) < 1e-6
    assert [t for t, _ in result.top_logprobs[0]] == ref.topk(3).indices.tolist()
