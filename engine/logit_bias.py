"""logit_bias: a bias added to chosen tokens' logits before sampling (OpenAI's -100..100: ban to certainty).

Applied on the logits' device for the whole batch at once (one indexed add), after the grammar's
mask and before min_tokens bans and penalties, as vLLM orders its logits processors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from engine.host_device import upload
from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams

BIAS_LIMIT = 100.0


def check_logit_bias(bias: Mapping[int, float] | None, vocab_size: int) -> None:
    """Biases within OpenAI's range on token ids of the vocabulary; a 400 naming `logit_bias` otherwise."""
    for token_id, value in (bias or {}).items():
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"logit_bias: token id {token_id} is out of range for a vocabulary of "
                                      f"{vocab_size}", "logit_bias")
        if not -BIAS_LIMIT <= value <= BIAS_LIMIT:
            raise InvalidRequestError(f"logit_bias: the bias of token {token_id} must be between -100 and 100",
                                      "logit_bias")


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Add row i's `params[i].logit_bias` to `logits[i]` in place."""
    rows = [i for i, p in enumerate(params) if p.logit_bias for _ in p.logit_bias]
    if not rows:
        return
    tokens = [t for p in params if p.logit_bias for t in p.logit_bias]
    values = [v for p in params if p.logit_bias for v in p.logit_bias.values()]
    device = logits.device
    logits.index_put_((upload(rows, torch.long, device), upload(tokens, torch.long, device)),
                      upload(values, logits.dtype, device), accumulate=True)
