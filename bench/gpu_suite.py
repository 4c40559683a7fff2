"""The whole GPU check in one command: kernel tests, kernel benchmarks, gpt-oss-20b decode (a whole step
and one layer), and the MoE kernels next to triton_kernels' where that package can be imported.

Every part runs in its own subprocess with its own time limit (a CUDA fault or a
hang in one part cannot take the others down), under one overall budget that
fits a 10-minute device call. Whatever happens, a report is written:
bench/results/gpu-<device>-<UTC date>.md and .json.

    bash bench/gpu_suite.sh            # or: python -m bench.gpu_suite [--budget 540]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

    from bench.kernels import Bench
    from engine.models.decoder import DecoderLM
    from kernels.mxfp4 import MXFP4Tensor
    from kernels.ops import Ops

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
KERNEL_SUITES = ("mxfp4", "moe", "attention", "elementwise")

# Targets from the kernels issue, checked on the benchmark rows.
BW_TARGET = 0.70  # of measured copy bandwidth, decode shapes (T <= 256)


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a part; returns rc, seconds, and the tail of its output (rc 124 on timeout)."""
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out += f"\n[timed out after {timeout:.0f} s]"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - start, 1), "tail": out[-6000:]}


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    try:
        import torch
        import triton

        info.update(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    except Exception as exc:  # the report must still be written
        info["error"] = f"{type(exc).__name__}: {exc}"
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        info["commit"] = "unknown"
    return info


def run_tests(timeout: float) -> dict[str, Any]:
    # The kernel tests and the models' Triton twins; their CPU variants skip themselves on a GPU.
    patterns = ("test_kernels*.py", "test_models_triton.py")
    tests = sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in (ROOT / "tests").glob(pattern))
    tests.append("tests/test_tensor_parallel.py::test_two_gpus_match_one")  # NCCL row: skips with fewer than 2 GPUs
    part = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], timeout)
    match = re.findall(r"^=*\s*(.*(?:passed|failed|error).*?)\s*=*$", part["tail"], re.MULTILINE)
    part["summary"] = match[-1] if match else "no pytest summary (see tail)"
    return part


def _run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run a part that writes its results to the JSON file named after `cmd` (kept as part["report"])."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        part = _run([*cmd, str(out)], timeout)
        if out.exists():
            part["report"] = json.loads(out.read_text())
    return part


def run_kernel_bench(suite: str, timeout: float, smoke: bool) -> dict[str, Any]:
    smoke_flag = ["--smoke"] if smoke else []
    return _run_json([sys.executable, "-m", "bench.kernels", "--only", suite, *smoke_flag, "--json"], timeout)


def run_model_decode(timeout: float) -> dict[str, Any]:
    return _run_json([sys.executable, "-m", "bench.gpu_suite", "--model-decode-json"], timeout)


def run_peer_kernels(timeout: float) -> dict[str, Any]:
    part = _run_json([sys.executable, "-m", "bench.peer_kernels", "--json"], timeout)
    part["summary"] = part.get("report", {}).get("skipped", "")
    return part


# gpt-oss-20b: 24 layers, hidden 2880, 64/8 heads of 64, 32 experts (top 4) of width 2880, vocab 201088.
GPT_OSS_20B = {"layers": 24, "hidden": 2880, "heads": 64, "kv_heads": 8, "head_dim": 64, "experts": 32,
               "top_k": 4, "inter": 2880, "vocab": 201088, "window": 128}


def time_decode_step(step: Callable[[], torch.Tensor], batch: int, device: str, timer: Bench) -> dict[str, Any]:
    """One decode step's time, eager and (on CUDA) as a CUDA graph; off CUDA the logits, for the harness test."""
    import torch

    row: dict[str, Any] = {"eager_ms": round(timer.time_ms(step), 3)}
    if device != "cuda":
        return row | {"logits": step()}
    try:
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        row["graph_ms"] = round(timer.time_ms(graph.replay), 3)
    except Exception as exc:
        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["tokens_per_s"] = round(batch / row.get("graph_ms", row["eager_ms"]) * 1e3, 1)
    return row


def kernel_stack_decode(
    batches: tuple[int, ...] = (1, 8, 64), context: int = 1024, block_size: int = 16,
    config: dict[str, Any] | None = None, device: str = "cuda", ops: Ops | None = None,
) -> dict[str, Any]:
    """Time one gpt-oss-20b decode step composed directly from `kernels.triton_ops` (random weights).

    This is the kernels' own floor for a step (no model code around them): per layer
    norm, qkv, rope fused with the KV write, paged attention with sinks (window 128 on every other
    layer), o-proj, norm, router, MXFP4 MoE (routing, gate_up, down with the combine); then the final norm and unembedding.
    Timed eagerly and, where capture works, as one CUDA graph. The engine's model
    (engine.models) is timed separately when it exists. `config`/`device`/`ops` shrink
    it for a CPU run under the interpreter (or swap in `kernels.reference`); the
    step's logits are returned there.
    """
    import torch

    from bench.kernels import Bench, random_mxfp4

    if ops is None:
        from kernels import triton_ops

        ops = triton_ops

    c, dev, bf = config or GPT_OSS_20B, device, torch.bfloat16
    timer = Bench(dev, smoke=dev != "cuda")
    h, d, nh, nkv, e, inter = c["hidden"], c["head_dim"], c["heads"], c["kv_heads"], c["experts"], c["inter"]
    qkv_out = (nh + 2 * nkv) * d

    def dense(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=bf) * 0.02

    layers: list[dict[str, Any]] = [
        {
            "norm1": torch.ones(h, device=dev, dtype=bf), "norm2": torch.ones(h, device=dev, dtype=bf),
            "qkv": dense(qkv_out, h), "qkv_b": dense(qkv_out), "o": dense(h, nh * d), "o_b": dense(h),
            "sinks": dense(nh), "router": dense(e, h), "router_b": dense(e),
            "gate_up": ops.prepare_weight(random_mxfp4((e, 2 * inter, h), dev)), "gate_up_b": dense(e, 2 * inter),
            "down": ops.prepare_weight(random_mxfp4((e, h, inter), dev)), "down_b": dense(e, h),
        }
        for _ in range(c["layers"])
    ]
    final_norm, unembed = torch.ones(h, device=dev, dtype=bf), dense(c["vocab"], h)
    inv_freq = 1.0 / (150000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    weight_bytes = sum(
        t.numel() * t.element_size() for layer in layers for t in layer.values() if isinstance(t, torch.Tensor)
    ) + unembed.numel() * 2
    results: dict[str, Any] = {"context": context, "weights_gb_on_device": round(weight_bytes / 1e9, 2)}
    for batch in batches:
        blocks_per_seq = -(-(context + 1) // block_size)
        num_blocks = batch * blocks_per_seq
        caches = [
            (torch.randn(num_blocks, block_size, nkv, d, device=dev, dtype=bf),
             torch.randn(num_blocks, block_size, nkv, d, device=dev, dtype=bf))
            for _ in layers
        ]
        tables = torch.arange(num_blocks, device=dev, dtype=torch.int32).view(batch, blocks_per_seq)
        seq_lens = torch.full((batch,), context + 1, device=dev, dtype=torch.int32)
        starts = torch.arange(batch + 1, device=dev, dtype=torch.int32)
        slots = (tables[:, context // block_size].long() * block_size + context % block_size)
        positions = torch.full((batch,), context, device=dev)
        x0 = dense(batch, h) * 50

        def step() -> torch.Tensor:
            x, residual = x0, None
            for i, (w, (k_cache, v_cache)) in enumerate(zip(layers, caches)):
                if residual is None:
                    hs, residual = ops.rms_norm(x, w["norm1"], 1e-5), x
                else:
                    hs, residual = ops.rms_norm(x, w["norm1"], 1e-5, residual)
                qkv = ops.linear(hs, w["qkv"], w["qkv_b"])
                q = qkv[:, : nh * d].view(batch, nh, d)
                k = qkv[:, nh * d : (nh + nkv) * d].view(batch, nkv, d)
                v = qkv[:, (nh + nkv) * d :].view(batch, nkv, d)
                q = ops.rope_write_kv(q, k, v, positions, inv_freq, 1.0, k_cache, v_cache, slots)
                window = c["window"] if i % 2 == 0 else None
                attn = ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, starts, d**-0.5, window, w["sinks"])
                x = ops.linear(attn.view(batch, nh * d), w["o"], w["o_b"])
                hs, residual = ops.rms_norm(x, w["norm2"], 1e-5, residual)
                logits = ops.linear(hs, w["router"], w["router_b"])
                x = ops.moe(hs, logits, c["top_k"], w["gate_up"], w["gate_up_b"], w["down"], w["down_b"])
            hs, _ = ops.rms_norm(x, final_norm, 1e-5, residual)
            return ops.linear(hs, unembed).float()

        results[f"batch {batch}"] = time_decode_step(step, batch, dev, timer)
        del caches
        torch.cuda.empty_cache()
    return results


def gpt_oss_config(layers: int = 24, hidden: int = 2880, heads: int = 64, kv_heads: int = 8, head_dim: int = 64,
                   experts: int = 32, top_k: int = 4, inter: int = 2880, vocab: int = 201088,
                   window: int = 128) -> dict[str, Any]:
    """An HF-style gpt-oss config dict (gpt-oss-20b's by default) with MXFP4 experts."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "vocab_size": vocab, "rms_norm_eps": 1e-5, "sliding_window": window,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        "rope_theta": 150000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
        "swiglu_limit": 7.0, "attention_bias": True, "quantization_config": {"quant_method": "mxfp4"},
    }  # fmt: skip


class _RandomTensor:
    """A lazily generated random tensor on the device, shaped like a checkpoint entry."""

    def __init__(self, shape: tuple[int, ...], device: str, kind: str = "dense") -> None:
        self.shape, self.device, self.kind = shape, device, kind
        self.dtype_name = "U8" if kind in ("blocks", "scales") else "BF16"

    def load(self) -> torch.Tensor:
        import torch

        if self.kind == "blocks":
            return torch.randint(0, 256, self.shape, dtype=torch.uint8, device=self.device)
        if self.kind == "scales":
            return torch.randint(120, 124, self.shape, dtype=torch.uint8, device=self.device)
        if self.kind == "norm":
            return torch.ones(self.shape, dtype=torch.bfloat16, device=self.device)
        return torch.randn(self.shape, dtype=torch.bfloat16, device=self.device) * 0.02


class RandomGptOssStore(dict[str, Any]):
    """name -> _RandomTensor for every tensor engine.models' gpt-oss loader reads (official MXFP4 layout)."""

    def __init__(self, config: dict[str, Any], device: str) -> None:
        super().__init__()
        h, e, i = config["hidden_size"], config["num_local_experts"], config["intermediate_size"]
        q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]

        def add(name: str, shape: tuple[int, ...], kind: str = "dense") -> None:
            self[name] = _RandomTensor(tuple(shape), device, kind)

        for layer in range(config["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            for proj, out in (("q", q), ("k", kv), ("v", kv)):
                add(f"{p}.self_attn.{proj}_proj.weight", (out, h))
                add(f"{p}.self_attn.{proj}_proj.bias", (out,))
            add(f"{p}.self_attn.o_proj.weight", (h, q))
            add(f"{p}.self_attn.o_proj.bias", (h,))
            add(f"{p}.self_attn.sinks", (config["num_attention_heads"],))
            add(f"{p}.mlp.router.weight", (e, h))
            add(f"{p}.mlp.router.bias", (e,))
            for name, out, inp in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
                add(f"{p}.mlp.experts.{name}_blocks", (e, out, inp // 32, 16), "blocks")
                add(f"{p}.mlp.experts.{name}_scales", (e, out, inp // 32), "scales")
                add(f"{p}.mlp.experts.{name}_bias", (e, out))
            add(f"{p}.input_layernorm.weight", (h,), "norm")
            add(f"{p}.post_attention_layernorm.weight", (h,), "norm")
        add("model.embed_tokens.weight", (config["vocab_size"], h))
        add("model.norm.weight", (h,), "norm")
        add("lm_head.weight", (config["vocab_size"], h))

    def mxfp4(self, prefix: str) -> MXFP4Tensor:
        from kernels.mxfp4 import MXFP4Tensor

        return MXFP4Tensor(self[f"{prefix}_blocks"].load(), self[f"{prefix}_scales"].load())


def random_gpt_oss_model(config: dict[str, Any], device: str, ops: Ops | None = None) -> DecoderLM:
    """An engine gpt-oss model (engine.models.build_model, bf16) over random weights of `config`'s shapes."""
    from types import SimpleNamespace

    import torch

    from engine.loader.open import LoadedModel
    from engine.models import build_model

    # A stand-in with the three fields build_model reads (config, tensors, info.format), not a file's model.
    loaded = cast(LoadedModel, SimpleNamespace(
        config=config, tensors=RandomGptOssStore(config, device), info=SimpleNamespace(format="safetensors")
    ))
    return build_model(loaded, device=device, dtype=torch.bfloat16, ops=ops)


def engine_model_decode(
    config: dict[str, Any] | None = None, device: str = "cuda", batches: tuple[int, ...] = (1, 64, 256),
    context: int = 1024, block_size: int = 16, ops: Ops | None = None,
) -> dict[str, Any]:
    """One decode step of gpt-oss-20b (real shapes, random weights made on the device) built through
    engine.models.build_model and driven like the engine; eager and, where capture works, as a CUDA
    graph. `config`/`device`/`ops` shrink it for a CPU run under the interpreter (logits returned)."""
    import torch

    from bench.kernels import Bench
    from engine.attention_metadata import AttentionMetadata

    config = config or gpt_oss_config()
    model = random_gpt_oss_model(config, device, ops)
    timer = Bench(device, smoke=device != "cuda")
    results: dict[str, Any] = {"context": context}
    for batch in batches:
        blocks_per_seq = -(-(context + 1) // block_size)
        shape = (batch * blocks_per_seq, block_size, model.num_kv_heads, model.head_dim)
        model.bind_kv_caches(
            [(torch.randn(shape, device=device, dtype=model.kv_cache_dtype),
              torch.randn(shape, device=device, dtype=model.kv_cache_dtype)) for _ in range(model.num_layers)]
        )  # fmt: skip
        tables = torch.arange(shape[0], device=device, dtype=torch.int32).view(batch, blocks_per_seq)
        meta = AttentionMetadata(
            slot_mapping=tables[:, context // block_size].long() * block_size + context % block_size,
            block_tables=tables,
            seq_lens=torch.full((batch,), context + 1, device=device, dtype=torch.int32),
            query_start_loc=torch.arange(batch + 1, device=device, dtype=torch.int32),
            num_decode_tokens=batch,
        )
        ids = torch.randint(0, config["vocab_size"], (batch,), device=device)
        positions = torch.full((batch,), context, device=device)

        def step() -> torch.Tensor:
            return model.forward(ids, positions, meta)

        results[f"batch {batch}"] = time_decode_step(step, batch, device, timer)
    return results


def _release_gpu_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's H100 targets, each with the rows it was judged on."""
    checks = []

    def bw_check(name: str, kernel: str) -> None:
        picked = [r for r in rows if r["kernel"] == kernel and r["tokens"] <= 256]
        if picked:
            worst = min(r["bw_fraction"] for r in picked)
            checks.append({"target": name, "ok": worst >= BW_TARGET, "detail": f"worst {worst:.0%} over {len(picked)} rows"})

    bw_check(f"MXFP4 linear decode >= {BW_TARGET:.0%} of copy bandwidth", "mxfp4_linear")
    bw_check(f"paged decode attention >= {BW_TARGET:.0%} of copy bandwidth", "paged_attention decode")
    moe = [r for r in rows if r["kernel"] == "mxfp4_moe" and r["tokens"] == 256 and r["speedup"]]
    if moe:
        checks.append({"target": "MXFP4 MoE at batch 256 faster than torch bf16 experts",
                       "ok": all(r["speedup"] > 1 for r in moe), "detail": f"{moe[0]['speedup']:.2f}x"})
    return checks


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# Minerva GPU check: {env.get('gpu', 'no GPU')} ({report['date']})", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## Parts", "", "| part | rc | seconds | note |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        note = part.get("summary") or ("; ".join(f"{k}: {v}" for k, v in part.get("report", {}).get("errors", {}).items()))
        lines.append(f"| {name} | {part['rc']} | {part['seconds']} | {note} |")
    ceil = report.get("ceilings", {})
    if ceil:
        lines += ["", f"Measured copy bandwidth {ceil['copy_gb_per_s']:.0f} GB/s, "
                  f"bf16 matmul {ceil['bf16_tflop_per_s']:.0f} TFLOP/s."]
    if report["targets"]:
        lines += ["", "## Targets", "", "| target | met | detail |", "|---|---|---|"]
        lines += [f"| {t['target']} | {'yes' if t['ok'] else 'NO'} | {t['detail']} |" for t in report["targets"]]
    if report["rows"]:
        lines += ["", "## Kernels", "", "| kernel | model | case | T | us | GB/s | of copy BW | TFLOP/s | of bf16 | vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["rows"]:
            speed = f"{r['speedup']:.2f}x {r['baseline']}" if r["speedup"] else ""
            lines.append(
                f"| {r['kernel']} | {r['model']} | {r['case']} | {r['tokens']} | {r['ms'] * 1e3:.1f} | "
                f"{r['gb_per_s']:.0f} | {r['bw_fraction']:.0%} | {r['tflop_per_s']:.1f} | {r['flop_fraction']:.0%} | {speed} |"
            )
    model = report["parts"].get("model_decode", {}).get("report")
    if model:
        lines += ["", "## gpt-oss-20b decode step (random weights, real shapes)", ""]
        for source, result in model.items():
            if not isinstance(result, dict):
                lines.append(f"- {source}: {result}")
                continue
            lines.append(f"- {source}: " + ", ".join(f"{k} {v}" for k, v in result.items() if not k.startswith("batch")))
            lines += [f"  - {k}: {v}" for k, v in result.items() if k.startswith("batch")]
    failed = {n: p for n, p in report["parts"].items() if p["rc"] != 0}
    for name, part in failed.items():
        lines += ["", f"## {name} output (rc {part['rc']})", "", "```", part["tail"][-3000:], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=540, help="seconds for all parts together")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: tests,bench,model,peer")
    parser.add_argument("--out", type=Path, default=RESULTS, help="report folder")
    parser.add_argument("--smoke", action="store_true", help="tiny benchmark shapes (harness check, CPU ok)")
    parser.add_argument("--model-decode-json", help=argparse.SUPPRESS)  # worker mode of the model_decode part
    args = parser.parse_args()
    if args.model_decode_json:
        result: dict[str, dict[str, Any] | str] = {}
        one_layer = GPT_OSS_20B | {"layers": 1, "vocab": 128}  # one decode layer (+ final norm, 128-row unembed)
        for name, fn in (
            ("engine_models", engine_model_decode),
            ("kernel_stack", kernel_stack_decode),
            ("decode_layer", lambda: kernel_stack_decode(batches=(1, 8, 64, 256), config=one_layer)),
        ):
            try:
                result[name] = fn()
            except Exception as exc:
                result[name] = f"failed: {type(exc).__name__}: {exc}"
            Path(args.model_decode_json).write_text(json.dumps(result, indent=1))
            _release_gpu_memory()
        return
    start, budget = time.time(), float(args.budget)
    skip = set(filter(None, args.skip.split(",")))

    def left() -> float:
        return budget - (time.time() - start)

    env = environment()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    report: dict[str, Any] = {"date": date, "environment": env, "parts": {}, "rows": [], "targets": []}
    plan = [("tests", 200)] if "tests" not in skip else []
    plan += [(f"bench_{s}", 70) for s in KERNEL_SUITES] if "bench" not in skip else []
    plan += [("model_decode", 90)] if "model" not in skip else []
    plan += [("peer_kernels", 40)] if "peer" not in skip else []
    for i, (name, share) in enumerate(plan):
        reserve = sum(s for _, s in plan[i + 1 :]) * 0.5  # later parts keep at least half their share
        limit = min(max(share, left() - reserve), left())
        if limit < 10:
            report["parts"][name] = {"rc": 125, "seconds": 0, "tail": "skipped: overall budget spent"}
            continue
        print(f"[{time.time() - start:5.0f} s] {name} (limit {limit:.0f} s)", flush=True)
        try:
            if name == "tests":
                part = run_tests(limit)
            elif name == "model_decode":
                part = run_model_decode(limit)
            elif name == "peer_kernels":
                part = run_peer_kernels(limit)
            else:
                part = run_kernel_bench(name.removeprefix("bench_"), limit, args.smoke)
        except Exception as exc:
            part = {"rc": 1, "seconds": 0, "tail": f"{type(exc).__name__}: {exc}"}
        report["parts"][name] = part
        bench = part.get("report", {})
        report["rows"] += bench.get("results", [])
        if "copy_gb_per_s" in bench:
            report["ceilings"] = {k: bench[k] for k in ("copy_gb_per_s", "bf16_tflop_per_s")}
        print(f"         rc {part['rc']} in {part['seconds']} s {part.get('summary', '')}", flush=True)
    report["targets"] = check_targets(report["rows"])
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", "nogpu")).strip("-").lower()
    base = args.out / f"gpu-{slug}-{date}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    base.with_suffix(".md").write_text(markdown(report))
    print(f"report: {base}.md / .json ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
