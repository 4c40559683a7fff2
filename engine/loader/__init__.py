"""The lazy model loader: format detection, ModelInfo metadata, lazy tensors, and a registry of models.

See docs/loader.md. Metadata never reads tensor bytes; tensors are memory-mapped on demand.
"""

from typing import TYPE_CHECKING

from engine.loader.checks import ModelCheck, check_models
from engine.loader.errors import ModelLoadError
from engine.loader.model_info import ModelInfo, format_size
from engine.loader.open import LoadedModel, detect_format, open_model, read_model_info
from engine.loader.registry import ModelRegistry

if TYPE_CHECKING:  # imported lazily at run time (below)
    from engine.loader.tensors import LazyTensor, TensorStore

_LAZY = {"LazyTensor", "TensorStore"}  # they import torch, which metadata readers (`minerva inspect`) never need


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from engine.loader import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LazyTensor",
    "LoadedModel",
    "ModelCheck",
    "ModelInfo",
    "ModelLoadError",
    "ModelRegistry",
    "TensorStore",
    "check_models",
    "detect_format",
    "format_size",
    "open_model",
    "read_model_info",
]
