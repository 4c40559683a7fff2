"""The batched sampler against the row-by-row reference sampler: distributions, penalties, seeds, masks."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import CDF_BLOCK, Sampler, SamplingRow, apply_token_bitmask
from engine.sampling_params import SamplingParams
from tests.reference_sampler import ReferenceRow, ReferenceSampler, apply_penalties, filter_logits

VOCAB = 16
DRAWS = 4000


def _chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of `counts` against `expected_probs` (zero-probability bins must be empty)."""
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "drew a token the reference never draws"
    expected = expected_probs[support].double() * counts.sum()
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def _reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits.unsqueeze(0) / params.temperature
    filtered = filter_logits(scaled, torch.tensor([params.top_k]), torch.tensor([params.top_p]),
                             torch.tensor([params.min_p]))
    return filtered.softmax(-1)[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.9, min_p=0.1),
])
def test_draws_follow_the_reference_distribution(params):
    torch.manual_seed(0)
    logits = torch.randn(VOCAB) * 1.5
    result = Sampler(seed=1)(logits.expand(DRAWS, VOCAB).clone(), [SamplingRow(params)] * DRAWS)
    counts = torch.bincount(torch.tensor(result.token_ids), minlength=VOCAB)
    assert _chi_square_p_value(counts, _reference_probs(logits, params)) > 1e-3


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=6)])
def test_two_level_draws_across_blocks_follow_the_reference(params):
    """A vocabulary of several CDF blocks and a partial last one: mass on block edges, the tail and the
    first token; top-k leaves most blocks without any mass (never drawn)."""
    vocab = 3 * CDF_BLOCK + 100
    logits = torch.full((vocab,), -30.0)
    hot = [0, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 7, 3 * CDF_BLOCK, vocab - 1]
    logits[hot] = torch.tensor([1.0, 0.5, 0.0, 1.5, -0.5, 0.8])
    result = Sampler(seed=3)(logits.expand(DRAWS, vocab).clone(), [SamplingRow(params)] * DRAWS)
    counts = torch.bincount(torch.tensor(result.token_ids), minlength=vocab)
    expected = _reference_probs(logits, params)
    if params.top_k > 0:
        assert counts[expected == 0].sum() == 0
    assert _chi_square_p_value(counts, expected) > 1e-3


def test_mixed_batch_rows_keep_their_own_settings():
    """Greedy, top-k and top-p rows interleaved: each row's draws follow its own distribution."""
    torch.manual_seed(1)
    logits = torch.randn(VOCAB) * 1.5
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=4),
             SamplingParams(temperature=1.0, top_p=0.7)]
    rows = [SamplingRow(kinds[i % 3]) for i in range(3 * 2000)]
    tokens = torch.tensor(Sampler(seed=2)(logits.expand(len(rows), VOCAB).clone(), rows).token_ids)
    assert (tokens[0::3] == logits.argmax()).all()
    for kind, drawn in ((kinds[1], tokens[1::3]), (kinds[2], tokens[2::3])):
        counts = torch.bincount(drawn, minlength=VOCAB)
        assert _chi_square_p_value(counts, _reference_probs(logits, kind)) > 1e-3


def _forced(token: int) -> torch.Tensor:
    """A bitmask row allowing only `token`."""
    words = torch.zeros(1, (VOCAB + 31) // 32, dtype=torch.int32)
    words[0, token // 32] = 1 << (token % 32)
    return words


def test_penalties_from_counted_tokens_match_the_reference():
    """Tokens forced through the bitmask are counted; the next step's logprobs are the reference's penalised ones."""
    torch.manual_seed(2)
    logits = torch.randn(1, VOCAB)
    prompt, out = [1, 2, 3], [3, 4, 4, 5]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                            logprobs=VOCAB)
    sampler = Sampler()
    row = SamplingRow(params, penalty_key="seq", prompt_token_ids=prompt)
    for token in out:
        assert sampler(logits.clone(), [row], token_bitmask=_forced(token)).token_ids == [token]
    result = sampler(logits.clone(), [row])
    want = logits.clone()
    apply_penalties(want, [ReferenceRow(params, prompt, out)])
    got = torch.full((VOCAB,), float("nan"))
    for token, logprob in result.top_logprobs[0]:
        got[token] = logprob
    torch.testing.assert_close(got, want.log_softmax(-1)[0])
    sampler.release("seq")
    fresh = sampler(logits.clone(), [SamplingRow(params, penalty_key="other", prompt_token_ids=[])])
    assert fresh.token_ids == logits.argmax(-1).tolist()  # a reused count row starts from zero


def test_seeded_rows_draw_what_the_reference_draws_in_any_batch():
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)

    def seeded() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    reference = ReferenceSampler()(logits[[2]].clone(), [ReferenceRow(params, [], [], seeded())]).token_ids[0]
    alone = Sampler(seed=5)(logits[[2]].clone(), [SamplingRow(params, seeded())]).token_ids[0]
    crowd = [SamplingRow(SamplingParams(temperature=1.0)), SamplingRow(SamplingParams(temperature=0)),
             SamplingRow(params, seeded())]
    crowded = Sampler(seed=6)(logits.clone(), crowd).token_ids[2]
    assert reference == alone == crowded


def test_logprobs_only_for_rows_that_ask_and_min_tokens_ban():
    torch.manual_seed(4)
    logits = torch.randn(2, VOCAB)
    banned = int(logits[0].argmax())
    rows = [SamplingRow(SamplingParams(temperature=0, logprobs=3), banned_token_ids=[banned]),
            SamplingRow(SamplingParams(temperature=0))]
    result = Sampler()(logits.clone(), rows)
    masked = logits[0].clone()
    masked[banned] = float("-inf")
    ref = masked.log_softmax(-1)
    assert result.token_ids == [int(masked.argmax()), int(logits[1].argmax())]
    assert abs(result.logprobs[0] - float(ref[result.token_ids[0]])) < 1e-6
    assert [t for t, _ in result.top_logprobs[0]] == ref.topk(3).indices.tolist()
    assert result.logprobs[1] is None and result.top_logprobs[1] is None


def test_token_bitmask_unpacks_like_xgrammar():
    vocab = 70  # three 32-bit words, the last partly used
    torch.manual_seed(5)
    bits = torch.rand(3, vocab) < 0.5
    bits[2] = True
    words = torch.zeros(3, 3, dtype=torch.int64)
    for r in range(3):
        for t in range(vocab):
            if bits[r, t]:
                words[r, t // 32] |= 1 << (t % 32)
    bitmask = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement words
    bitmask[2] = -1
    logits = torch.randn(3, vocab)
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask)
    torch.testing.assert_close(masked, logits.masked_fill(~bits, float("-inf")))
    wider = torch.randn(3, vocab + 40)  # a model vocab padded past the mask: only unconstrained rows keep it
    apply_token_bitmask(wider, bitmask)
    assert wider[:2, vocab + 26:].isinf().all() and wider[2].isfinite().all()


def test_constrained_rows_only_draw_allowed_tokens():
    logits = torch.randn(64, VOCAB)
    bitmask = torch.full((64, 1), 0b1010_0000, dtype=torch.int32)  # tokens 5 and 7
    result = Sampler()(logits, [SamplingRow(SamplingParams(temperature=1.0))] * 64, token_bitmask=bitmask)
    assert set(result.token_ids) <= {5, 7}
