"""What a step's messages cost: building the scheduler's SchedulerOutput and sending it and the runner's
RunnerOutput through msgpack.

Run: python -m bench.step_messages [--seqs 64 256] [--steps 40] [--repeats 20]

Real decode steps of bench.step_overhead's zero-cost engine (every sequence decoding, 16 generated
tokens fast-forwarded): each step's SchedulerOutput is captured as the runner receives it, and the
RunnerOutput it answers; then each captured message is encoded and decoded `--repeats` times with
msgspec (the engine's wire format) and, beside it, pickle. Reports microseconds per step for building
(StepMessages.build inside the step), encoding, decoding, and the bytes. Saves bench/results/step-messages-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import torch

from bench.step_overhead import StepTimer
from bench.throughput import commit
from engine.model_runner import StepResult
from engine.step_messages import RunnerOutput, SchedulerOutput

RESULTS = Path(__file__).resolve().parent / "results"


def capture(num_seqs: int, steps: int) -> tuple[list[SchedulerOutput], list[RunnerOutput], list[float]]:
    """`steps` decode steps' messages, their answers and the time each message took to build."""
    engine = StepTimer(num_seqs, 16, steps).engine
    messages: list[SchedulerOutput] = []
    results: list[StepResult] = []
    build_s: list[float] = []
    execute, build = engine.executor.execute, engine.messages.build

    def timed_build(*args: Any) -> SchedulerOutput:
        start = time.perf_counter()
        step = build(*args)
        build_s.append(time.perf_counter() - start)
        return step

    def keep(step: SchedulerOutput) -> StepResult:
        messages.append(step)
        results.append(execute(step))
        return results[-1]

    # instance attributes shadow the methods
    setattr(engine.messages, "build", timed_build)
    setattr(engine.executor, "execute", keep)
    for _ in range(steps):
        engine.step()
    return messages, [result.output() for result in results], build_s


def per_step_us(messages: Sequence[object], function: Callable[[Any], object], repeats: int) -> float:
    """Median over messages of the best of `repeats` calls, in microseconds."""
    times = []
    for message in messages:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            function(message)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return statistics.median(times) * 1e6


def measure(num_seqs: int, steps: int, repeats: int) -> dict[str, Any]:
    messages, answers, build_s = capture(num_seqs, steps)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(SchedulerOutput)
    answer_decoder = msgspec.msgpack.Decoder(RunnerOutput)
    packed_answers = [encoder.encode(a) for a in answers]
    packed = [encoder.encode(m) for m in messages]
    pickled = [pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in messages]
    assert all(decoder.decode(p) == m for p, m in zip(packed, messages))
    return {"seqs": num_seqs, "steps": len(messages),
            "build_us": statistics.median(build_s) * 1e6,
            "msgspec_encode_us": per_step_us(messages, encoder.encode, repeats),
            "msgspec_decode_us": per_step_us(packed, decoder.decode, repeats),
            "msgspec_bytes": statistics.median(len(p) for p in packed),
            "pickle_dumps_us": per_step_us(messages, lambda m: pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL),
                                           repeats),
            "pickle_loads_us": per_step_us(pickled, pickle.loads, repeats),
            "pickle_bytes": statistics.median(len(p) for p in pickled),
            "answer_encode_us": per_step_us(answers, encoder.encode, repeats),
            "answer_decode_us": per_step_us(packed_answers, answer_decoder.decode, repeats),
            "answer_bytes": statistics.median(len(p) for p in packed_answers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "step-messages-cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(n, args.steps, args.repeats) for n in args.seqs]
    print(f"{'seqs':>5} {'build us':>9} {'encode us':>10} {'decode us':>10} {'bytes':>7} {'pickle dumps':>13} "
          f"{'pickle loads':>13} {'pickle bytes':>13} {'answer enc/dec us':>18} {'answer bytes':>13}")
    for r in rows:
        print(f"{r['seqs']:>5} {r['build_us']:>9.1f} {r['msgspec_encode_us']:>10.1f} {r['msgspec_decode_us']:>10.1f} "
              f"{r['msgspec_bytes']:>7.0f} {r['pickle_dumps_us']:>13.1f} {r['pickle_loads_us']:>13.1f} "
              f"{r['pickle_bytes']:>13.0f} {r['answer_encode_us']:>8.1f} / {r['answer_decode_us']:<7.1f} "
              f"{r['answer_bytes']:>13.0f}")
    report = {"device": f"cpu ({platform.processor() or platform.machine()})", "commit": commit(),
              "settings": {"steps": args.steps, "repeats": args.repeats, "generated": 16,
                           "note": "decode steps; 2-core CPU shared with other processes"}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
