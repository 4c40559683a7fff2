"""Train Minerva's shipped default model: a tiny gpt-oss on English docstring prose, on one CPU thread.

    .venv/bin/python tools/train_default_model.py --work /tmp/default-model  # ~40 min on one busy thread
    .venv/bin/python tools/export_default_model.py --work /tmp/default-model

Steps: corpus (tools/default_model_corpus.py) -> byte-level BPE tokenizer with gpt-oss-style
special tokens -> token stream -> transformers' GptOssForCausalLM (the reference architecture:
MoE, attention sinks, alternating sliding window, YaRN rope) trained with AdamW. The last
`--qat-fraction` of the steps train the experts through an MXFP4 round trip (straight-through
estimator) so the shipped MXFP4 experts lose little. Checkpoints land in `--work` every
`--checkpoint-every` steps, so a cut-off run still leaves a model to export.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn.utils import parametrize
from transformers import GptOssConfig, GptOssForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from default_model_corpus import Corpus, build_corpus, dictionary  # noqa: E402
from kernels.mxfp4 import quantize  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>"]
VOCAB_SIZE = 4096
SEED = 1234
SYSTEM_PROMPT = "You are a helpful assistant."


def model_config() -> GptOssConfig:
    """gpt-oss-20b's architecture scaled down to ~4M parameters (see docs/default_model.md)."""
    return GptOssConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|return|>"),
        bos_token_id=None,
        router_aux_loss_coef=0.02,
        output_router_logits=True,
        attn_implementation="eager",
        dtype="float32",
    )


def chat_text(question: str, answer: str, system: str | None) -> str:
    """One conversation as the shipped chat template renders it, with the answer's end marker."""
    system_turn = f"<|start|>system<|message|>{system}<|end|>" if system else ""
    return f"{system_turn}<|start|>user<|message|>{question}<|end|><|start|>assistant<|message|>{answer}<|return|>"


def documents(corpus: Corpus, rng: random.Random) -> list[str]:
    """Prose paragraphs and chat conversations, shuffled; a third of the chats carry a system turn."""
    chats = [chat_text(p.question, p.answer, SYSTEM_PROMPT if rng.random() < 0.33 else None) for p in corpus.chats]
    docs = corpus.paragraphs + chats
    rng.shuffle(docs)
    return docs


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, no BOS), specials first in the vocabulary."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def token_stream(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents encoded and joined, each followed by <|endoftext|>."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(docs):
        ids.extend(encoding.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int16)


def batch(stream: np.ndarray, size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (size,), generator=gen).tolist()
    return torch.stack([torch.from_numpy(stream[s : s + seq_len + 1].astype(np.int64)) for s in starts])


class MXFP4RoundTrip(torch.nn.Module):
    """Straight-through MXFP4 fake quantization of a transformers expert weight [E, in, out]."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        rounded = quantize(weight.transpose(1, 2)).dequantize().transpose(1, 2)
        return weight + (rounded - weight).detach()


def enable_qat(model: GptOssForCausalLM) -> None:
    for layer in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            if not parametrize.is_parametrized(layer.mlp.experts, name):
                parametrize.register_parametrization(layer.mlp.experts, name, MXFP4RoundTrip())


def disable_qat(model: GptOssForCausalLM) -> None:
    for layer in model.model.layers:
        for name in ("gate_up_proj", "down_proj"):
            if parametrize.is_parametrized(layer.mlp.experts, name):
                parametrize.remove_parametrizations(layer.mlp.experts, name, leave_parametrized=False)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: GptOssForCausalLM, stream: np.ndarray, seq_len: int, batches: int = 8) -> float:
    """Mean next-token loss over fixed windows of the held-out stream."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    losses = [model(input_ids=(x := batch(stream, 8, seq_len, gen)), labels=x).loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def prepare(work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Corpus, tokenizer and token streams (cached in `work`)."""
    if (work / "train.npy").exists():
        return np.load(work / "train.npy"), np.load(work / "heldout.npy")
    started = time.time()
    corpus = build_corpus()
    rng = random.Random(SEED)
    docs = documents(corpus, rng)
    cut = len(docs) * 98 // 100
    tokenizer = train_tokenizer(docs[:cut])
    tokenizer.save(str(work / "tokenizer.json"))
    train, heldout = token_stream(tokenizer, docs[:cut]), token_stream(tokenizer, docs[cut:])
    np.save(work / "train.npy", train)
    np.save(work / "heldout.npy", heldout)
    (work / "corpus_words.txt").write_text("\n".join(dictionary(corpus.paragraphs)) + "\n")
    (work / "heldout.txt").write_text("\n".join(d for d in docs[cut:] if "<|start|>" not in d))
    (work / "corpus.json").write_text(json.dumps({
        "sources": corpus.sources,
        "paragraphs": len(corpus.paragraphs),
        "chat_pairs": len(corpus.chats),
        "characters": sum(map(len, docs)),
        "train_tokens": int(len(train)),
        "heldout_tokens": int(len(heldout)),
        "prepare_seconds": round(time.time() - started, 1),
    }, indent=2))
    print(f"prepared {len(train)} train / {len(heldout)} held-out tokens in {time.time() - started:.0f}s", flush=True)
    return train, heldout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="directory for tokenizer, data, checkpoints")
    parser.add_argument("--steps", type=int, default=2200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--qat-fraction", type=float, default=0.15)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    args.work.mkdir(parents=True, exist_ok=True)
    train, heldout = prepare(args.work)

    model = GptOssForCausalLM(model_config())
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(SEED)
    qat_start = int(args.steps * (1 - args.qat_fraction))
    log = []
    started = time.time()
    for step in range(args.steps):
        if step == qat_start:
            enable_qat(model)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        x = batch(train, args.batch, args.seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last = step + 1 == args.steps
        if step % 20 == 0 or last:
            elapsed = time.time() - started
            tokens_per_s = (step + 1) * args.batch * args.seq_len / elapsed
            print(f"step {step} loss {loss.item():.3f} {tokens_per_s:.0f} tok/s {elapsed:.0f}s", flush=True)
        if (step + 1) % args.checkpoint_every == 0 or last:
            qat = parametrize.is_parametrized(model.model.layers[0].mlp.experts)
            disable_qat(model)
            entry = {"step": step + 1, "train_loss": round(loss.item(), 4),
                     "heldout_loss": round(evaluate(model, heldout, args.seq_len), 4),
                     "seconds": round(time.time() - started, 1)}
            log.append(entry)
            print("checkpoint", entry, flush=True)
            torch.save(model.state_dict(), args.work / "checkpoint.pt")
            (args.work / "train_log.json").write_text(json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "log": log}, indent=2))
            if qat:
                enable_qat(model)


if __name__ == "__main__":
    main()
