"""From a step's token ids to what people read: text, stop strings, logprob text, delta RequestOutputs.

vLLM v1 splits the same way: the engine's step only appends token ids and applies the rules that
need no text (stop tokens, lengths, grammars), which keeps the step loop's per-sequence work to a
list append and a few comparisons. Everything that decodes text happens here, after the next
forward has been launched (async scheduling), so on a GPU it runs while the device computes. A
stop string found here finishes the sample (`finish_reason` "stop"); the engine then retires it
and drops any token it already computed past the stop.

An engine core in its own process turns `detokenize` off: its outputs carry token ids (and logprobs,
whose token texts are byte lookups) with empty text, and each API process makes the text of its own
requests (engine/stream_text.py), as vLLM's front end does, so the core's step does none of it.
"""

from __future__ import annotations

from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.request import Request, Sample
from engine.step_messages import RunnerOutput
from engine.token_bytes import token_text
from engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, detokenize: bool = True) -> None:
        self.tokenizer = tokenizer
        self.detokenize = detokenize  # requests prepared from now on get detokenizers (Request.detoks)

    def add_tokens(self, requests: dict[str, Request], samples: list[Sample], rows: list[int],
                   result: RunnerOutput) -> tuple[list[Request], list[Sample]]:
        """Detokenize each sample's newest token (`rows[i]` of `result` holds its logprobs).

        Returns the requests that changed and the samples a stop string has just finished.
        """
        touched: dict[str, Request] = {}
        stopped = []
        for seq, row in zip(samples, rows):
            request = requests[seq.request_id]
            touched[seq.request_id] = request
            token = seq.output_token_ids[-1]
            p = seq.params
            if p.logprobs is not None:
                request.progress[seq.index].logprobs.append(self._logprob(token, result, row, p.logprobs))
            if not request.detoks:
                continue  # its text is made in an API process
            detok = request.detoks[seq.index]
            detok.add(token, len(seq.output_token_ids))
            if detok.stopped_by is not None:
                if seq.finish_reason is None:
                    stopped.append(seq)
                seq.finish_reason, seq.stop_reason = detok.finish(seq.finish_reason, seq.stop_reason)
        return list(touched.values()), stopped

    def _logprob(self, token: int, result: RunnerOutput, row: int, top_n: int) -> TokenLogprob:
        """Token texts from the tokens' bytes: a partial character shows as `\\xNN` escapes, not U+FFFD."""
        logprob, top_logprobs = result.logprobs[row], result.top_logprobs[row]
        assert logprob is not None and top_logprobs is not None, "the runner scores every row whose request asked"
        token_bytes = self.tokenizer.token_bytes
        top = [(t, token_text(token_bytes(t)), lp) for t, lp in top_logprobs[:top_n]]
        return TokenLogprob(token, token_text(token_bytes(token)), logprob, top)

    @staticmethod
    def output(request: Request) -> RequestOutput:
        """What changed since the request's previous output: new ids, text and logprobs per sample."""
        deltas = []
        detoks = request.detoks
        for seq, sample in zip(request.samples, request.progress):
            finished = seq.finish_reason is not None
            new_ids = seq.output_token_ids[sample.reported_tokens:]
            text = detoks[seq.index].take_delta(finished) if detoks else ""
            if not (new_ids or text or (finished and not sample.reported_finish)):
                continue
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs, sample.logprobs = sample.logprobs, []
            sample.reported_tokens = len(seq.output_token_ids)
            sample.reported_finish = finished
            deltas.append(CompletionOutput(seq.index, text, new_ids, logprobs, seq.finish_reason,
                                           seq.stop_reason, len(seq.output_token_ids)))
        samples = request.samples
        cached = samples[0].num_cached_tokens if len(samples) == 1 else min(s.num_cached_tokens for s in samples)
        drafted = accepted = 0
        for seq in samples:
            drafted += seq.num_draft_tokens
            accepted += seq.num_accepted_tokens
        prompt_logprobs = None
        if request.prompt_logprobs is not None and deltas and not request.prompt_logprobs_sent:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        return RequestOutput(request.request_id, request.prompt_token_ids, deltas, request.finished, cached,
                             drafted, accepted, prompt_logprobs)
