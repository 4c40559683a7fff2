"""The text of a request whose engine core runs in another process: made in the API process, from token deltas.

vLLM's front-end detokenizer: the core's outputs carry token ids with no text (its OutputProcessor runs
with `detokenize` off), and each API process decodes its own requests, with the rules the in-process
engine applies (engine/detokenizer.py), so its outputs read the same. A stop string found here ends the
sample at once: the token that completed it is the sample's last (the ids the core computed past it are
dropped), and the caller tells the core to stop the sample (`LLMEngine.finish_sample`).
"""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class RequestText:
    """One request's detokenizers, made from its first output (the prompt's ids come with it)."""

    __slots__ = ("tokenizer", "params", "prompt_token_ids", "detoks", "finished")

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.prompt_token_ids: list[int] | None = None  # the core sends them with the first output only
        self.detoks: list[IncrementalDetokenizer] = []
        self.finished = [False] * params.n  # per sample, as seen here (a stop string may end it before the core)

    def apply(self, output: RequestOutput) -> list[tuple[int, str]]:
        """Fill in `output`'s text in place, cut at a stop string; the samples a stop string ended here that the
        core still runs, as (index, stop string). Samples that ended here earlier are left out of `output`."""
        if self.prompt_token_ids is None:
            self._start(output.prompt_token_ids)
        else:
            output.prompt_token_ids = self.prompt_token_ids
        stopped = []
        deltas = []
        for delta in output.outputs:
            index = delta.index
            if self.finished[index]:
                continue  # computed past a stop string before the core heard of it
            detok = self.detoks[index]
            ids = delta.token_ids
            first = delta.num_generated - len(ids)
            core_runs_it = delta.finish_reason is None
            for position, token in enumerate(ids):
                detok.add(token, first + position + 1)
                if detok.stopped_by is None:
                    continue
                if position + 1 < len(ids):  # the core went on past the stop: what followed it never happened
                    del ids[position + 1:]
                    if delta.logprobs is not None:
                        del delta.logprobs[position + 1:]
                    delta.num_generated = first + position + 1
                    delta.finish_reason, delta.stop_reason = "stop", detok.stopped_by
                else:
                    delta.finish_reason, delta.stop_reason = detok.finish(delta.finish_reason, delta.stop_reason)
                if core_runs_it:
                    stopped.append((index, detok.stopped_by))
                break
            finished = self.finished[index] = delta.finish_reason is not None
            delta.text = detok.take_delta(finished)
            deltas.append(delta)
        output.outputs = deltas
        output.finished = all(self.finished)
        return stopped

    def _start(self, prompt_token_ids: list[int]) -> None:
        params = self.params
        self.prompt_token_ids = prompt_token_ids
        ending = params.ending_token_ids(self.tokenizer.eos_token_ids)
        self.detoks = [IncrementalDetokenizer.for_sample(self.tokenizer, prompt_token_ids, params, ending)
                       for _ in range(params.n)]
