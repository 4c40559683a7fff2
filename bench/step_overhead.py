"""Host time of one decode step with a model that costs nothing: what the engine itself adds per step.

Run: python -m bench.step_overhead [--seqs 256 1024] [--generated 16 4096] [--steps 60] [--rounds 6]

Each step is a real `LLMEngine.step()` (scheduling, input building, the sampler's bookkeeping,
token append, stop-token and length rules, then detokenizing, stop strings and delta outputs)
over a model that returns ready-made logits. Three shares are reported apart: "host" is the
engine's own step (everything but the two below), "outputs" the output processor (text, stop
strings, delta RequestOutputs: under async scheduling it runs while the device computes the next
step), and the sampler's tensor math; "messages" is the part of "host" the step messages take
(building the SchedulerOutput, the runner applying it, the runner appending the ids it sampled). The tokenizer is a
word-level table in the tokenizers library (no merges), so the numbers are the engine's, not a
vocabulary's. Sequences are fast-
forwarded to `--generated` output tokens (ids appended, KV blocks allocated) before timing, so
"16 vs 4096" isolates how per-step cost grows with length. Saves bench/results/step-overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from bench.throughput import commit
from bench.timed_sampler import TimedSampler
from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.decoder import LayerSpan
from engine.builder import engine_for_model
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 256
PROMPT_LEN = 32


def table_tokenizer() -> Tokenizer:
    """Token i is the word `t<i> `: decoding is a lookup in the tokenizers library, no merges, no byte fallback."""
    backend = HFTokenizer(models.WordLevel({f"t{i} ": i for i in range(VOCAB)}, unk_token="t0 "))
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend)


class ZeroCostModel:
    """KV-cache shape fields and logits that are already there: the forward does no work."""

    num_layers, num_kv_heads, head_dim, vocab_size = 1, 1, 1, VOCAB
    dtype, kv_cache_dtype, device = torch.float32, torch.float32, torch.device("cpu")

    def __init__(self, max_rows: int) -> None:
        self.logits = torch.zeros(max_rows, VOCAB)
        self.logits[:, 7] = 1.0

    def bind_kv_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pass

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        rows = attn_metadata.logits_indices
        return self.logits[: input_ids.shape[0] if rows is None else rows.shape[0]].clone()

    def forward_span(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                     span: LayerSpan) -> tuple[torch.Tensor, None]:
        """One layer: every span runs the last one, so no sequence has state left between steps."""
        return self.forward(input_ids, positions, attn_metadata), None


class CallTimer:
    """Times calls of some of an object's methods (its instance attributes shadow them)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner: object, *names: str) -> None:
        for name in names:
            method = getattr(owner, name)

            def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(owner, name, timed)


def fast_forward(engine: LLMEngine, generated: int) -> None:
    """Give every running sequence `generated` output tokens, as if it had decoded them (KV blocks included; the
    runner, which keeps the ids it samples itself, gets them too)."""
    runner = engine.executor.runner
    for seq in engine.scheduler.running:
        extra = generated - len(seq.output_token_ids)
        seq.output_token_ids.extend([7] * extra)
        runner.seqs[seq.seq_id].token_ids.extend([7] * extra)
        assert engine.scheduler._grow(seq, seq.num_tokens - 1), "KV pool too small"
        seq.num_computed_tokens = seq.num_tokens - 1


class StepTimer:
    """One engine with `num_seqs` sequences fast-forwarded to `generated` tokens; times steps in rounds."""

    def __init__(self, num_seqs: int, generated: int, max_steps: int) -> None:
        block_size = 16
        max_len = PROMPT_LEN + generated + max_steps + 8
        config = EngineConfig(block_size=block_size, max_num_seqs=num_seqs, async_scheduling=False,
                              max_num_batched_tokens=max(num_seqs * PROMPT_LEN, 2048), enable_prefix_caching=False)
        num_blocks = num_seqs * (-(-max_len // block_size) + 1)
        self.engine = engine_for_model(ZeroCostModel(num_seqs), table_tokenizer(), config, max_model_len=max_len,
                                num_blocks=num_blocks)
        runner = self.engine.executor.runner
        self.sampler = runner.sampler = TimedSampler(runner.sampler.seed)
        self.outputs = CallTimer()  # detokenizing, stop strings, delta outputs
        self.outputs.wrap(self.engine.outputs, "add_tokens", "output")
        self.messages = CallTimer()
        self.messages.wrap(self.engine.messages, "build")
        self.messages.wrap(runner, "update", "_append_sampled", "_append_sampled_plain")
        self.num_seqs = num_seqs
        params = SamplingParams(temperature=0, max_tokens=max_len - PROMPT_LEN, ignore_eos=True)
        for i in range(num_seqs):
            self.engine.add_request(str(i), [(i + j) % VOCAB for j in range(PROMPT_LEN)], params)
        self.engine.step()  # every prefill
        fast_forward(self.engine, generated)
        for _ in range(3):
            self.engine.step()  # warm up (the fast-forwarded tokens reported once, first block commits)
        self.totals: list[float] = []
        self.sampler_shares: list[float] = []
        self.output_shares: list[float] = []
        self.message_shares: list[float] = []

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.sampler.times.clear()
            self.outputs.seconds = self.messages.seconds = 0.0
            start = time.perf_counter()
            outputs = self.engine.step()
            self.totals.append(time.perf_counter() - start)
            self.sampler_shares.append(sum(self.sampler.times))
            self.output_shares.append(self.outputs.seconds)
            self.message_shares.append(self.messages.seconds)
            assert len(outputs) == self.num_seqs

    def result(self) -> dict[str, float]:
        core = [t - s - o for t, s, o in zip(self.totals, self.sampler_shares, self.output_shares)]

        def median_ms(values: list[float]) -> float:
            return statistics.median(values) * 1e3

        return {"host_ms": median_ms(core), "outputs_ms": median_ms(self.output_shares),
                "host_with_outputs_ms": median_ms([c + o for c, o in zip(core, self.output_shares)]),
                "sampler_ms": median_ms(self.sampler_shares), "total_ms": median_ms(self.totals),
                "messages_ms": median_ms(self.message_shares),
                "steps": len(self.totals)}


def measure(num_seqs: int, lengths: list[int], steps: int, rounds: int) -> dict[int, dict[str, float]]:
    """The lengths' engines take turns (`rounds` rounds of `steps / rounds` steps), so load from other
    processes on the shared CPU falls on all of them alike; medians over every timed step."""
    per_round = max(1, steps // rounds)
    timers = {generated: StepTimer(num_seqs, generated, per_round * rounds) for generated in lengths}
    for _ in range(rounds):
        for timer in timers.values():
            timer.run(per_round)
    return {generated: timer.result() for generated, timer in timers.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--generated", type=int, nargs="+", default=[16, 4096])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=6, help="turns the lengths take, to share out outside load")
    parser.add_argument("--out", type=Path, default=RESULTS / "step-overhead-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tensors here are tiny; worker threads would only contend for the shared cores
    rows = []
    print(f"{'seqs':>6} {'generated':>10} {'host ms/step':>13} {'outputs ms':>11} {'host+outputs':>13} "
          f"{'sampler ms':>11} {'total ms':>9} {'messages ms':>12}")
    for num_seqs in args.seqs:
        for generated, measured in measure(num_seqs, args.generated, args.steps, args.rounds).items():
            result = {"seqs": num_seqs, "generated": generated, **measured}
            rows.append(result)
            print(f"{num_seqs:>6} {generated:>10} {result['host_ms']:>13.3f} {result['outputs_ms']:>11.3f} "
                  f"{result['host_with_outputs_ms']:>13.3f} {result['sampler_ms']:>11.3f} {result['total_ms']:>9.3f} "
                  f"{result['messages_ms']:>12.3f}")
    for num_seqs in args.seqs:
        by_len = {r["generated"]: r["host_ms"] for r in rows if r["seqs"] == num_seqs}
        if len(by_len) > 1:
            print(f"{num_seqs} seqs: host time at {max(by_len)} / at {min(by_len)} generated tokens = "
                  f"{by_len[max(by_len)] / by_len[min(by_len)]:.2f}x")
    report = {"device": f"cpu ({platform.processor() or platform.machine()})", "commit": commit(),
              "settings": {"steps": args.steps, "rounds": args.rounds, "async_scheduling": False, "prompt_len": PROMPT_LEN, "vocab": VOCAB, "greedy": True,
                           "tokenizer": "tokenizers WordLevel table", "note": "2-core CPU shared with other processes"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
