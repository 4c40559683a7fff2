"""The shipped default model: a tiny gpt-oss trained on English docstring prose.

Served when `minerva serve` is given no model, so the quickstart works on a fresh machine
with no GPU and no internet. Built by tools/train_default_model.py and
tools/export_default_model.py; see docs/default_model.md (the model card).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "minerva-tiny-gpt-oss"
_ASSETS = Path(__file__).resolve().parent


def default_model_path() -> Path:
    """The HF-style checkpoint directory (config.json, MXFP4 model.safetensors, tokenizer files)."""
    return _ASSETS / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The same model as one GGUF file (arch gpt-oss, MXFP4 experts), as llama.cpp would convert it."""
    return _ASSETS / f"{DEFAULT_MODEL_NAME}.gguf"
