"""Numbers for the default model's card: held-out loss before/after MXFP4, and sample outputs.

    .venv/bin/python tools/evaluate_default_model.py --work /tmp/default-model

Scores the training checkpoint (fp32 experts) and the shipped files (MXFP4 experts, bf16
elsewhere, read back by transformers) on the same held-out windows, then prints greedy
completions and chat answers from the shipped files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import GptOssForCausalLM, Mxfp4Config, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from engine.assets import tiny_gpt_oss_dir  # noqa: E402
from export_default_model import load_trained  # noqa: E402

PROMPTS = ["Return the number of", "The default value is", "If the file does not exist,", "This class"]
QUESTIONS = ["What does the function sorted do?", "Tell me about the json module.", "Explain the class Counter."]


@torch.no_grad()
def heldout_loss(model: GptOssForCausalLM, stream: np.ndarray, seq_len: int = 512) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the held-out stream."""
    windows = torch.from_numpy(stream[: len(stream) // seq_len * seq_len].astype(np.int64)).view(-1, seq_len)
    return float(np.mean([model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stream = np.load(args.work / "heldout.npy")
    shipped = GptOssForCausalLM.from_pretrained(
        tiny_gpt_oss_dir(), quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    losses = {"checkpoint_fp32": heldout_loss(load_trained(args.work), stream), "shipped_mxfp4": heldout_loss(shipped, stream)}
    print(json.dumps({k: round(v, 4) for k, v in losses.items()}), f"({len(stream)} held-out tokens)")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_gpt_oss_dir())
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    for prompt in PROMPTS + chats:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = shipped.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
        print(repr(prompt), "->", repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
