"""A served model that plays a script by turns: what the tool-loop tests of every protocol and agent need."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.builder import engine_for_model
from engine.tokenizer import Tokenizer
from fake_model import FakeModel


class ScriptedModel(FakeModel):
    """FakeModel with logits scaled by `sharpness`: agents sample at temperature 1, and a peaked enough
    distribution still writes the script."""

    def __init__(self, vocab_size: int, predict, sharpness: float) -> None:
        super().__init__(vocab_size, predict)
        self.sharpness = sharpness

    def forward(self, *args):
        return super().forward(*args) * self.sharpness


def scripted_engine(model_dir: Path, scripts: list[str], *, sharpness: float = 1.0,
                    config: EngineConfig | None = None, max_model_len: int = 512,
                    num_blocks: int = 64) -> AsyncEngine:
    """An engine whose model writes scripts[k - 1] after the k-th `<|assistant|>` of its context (the last
    script for any later turn), then `</s>`; the model folder gives the tokenizer and chat template."""
    tokenizer = Tokenizer.from_files({name: model_dir / name for name in ("tokenizer.json", "tokenizer_config.json")})
    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in scripts]
    assistant, eos = tokenizer.backend.token_to_id("<|assistant|>"), tokenizer.backend.token_to_id("</s>")

    def predict(context: list[int], vocab_size: int) -> int:
        turns = [i for i, token in enumerate(context) if token == assistant]
        script = encoded[min(len(turns), len(encoded)) - 1]
        written = len(context) - 1 - turns[-1]
        return script[written] if written < len(script) else eos

    info = SimpleNamespace(architecture="llama", path=str(model_dir), to_dict=lambda: {})
    llm = engine_for_model(ScriptedModel(tokenizer.vocab_size, predict, sharpness), tokenizer,
                    config or EngineConfig(block_size=16), max_model_len=max_model_len, model_info=info,
                    num_blocks=num_blocks)
    return AsyncEngine(llm)
