"""Several models held by id, from explicit paths or by scanning a models directory."""

from __future__ import annotations

from pathlib import Path

from engine.loader.errors import ModelLoadError
from engine.loader.model_info import ModelInfo
from engine.loader.open import LoadedModel, default_model_id, open_model, read_model_info


class ModelRegistry:
    """Model id -> path and its metadata; tensors are opened only when a model is asked for with `open`."""

    def __init__(self) -> None:
        self._infos: dict[str, ModelInfo] = {}

    def add(self, path: str | Path, model_id: str | None = None) -> ModelInfo:
        """Register one model; its metadata is read now so a bad file fails here, not at first request."""
        path = Path(path)
        model_id = model_id or default_model_id(path)
        if model_id in self._infos:
            raise ModelLoadError(path, f"duplicate model id {model_id!r} (already {self._infos[model_id].path})")
        info = read_model_info(path, model_id)
        self._infos[model_id] = info
        return info

    def add_directory(self, directory: str | Path) -> list[ModelInfo]:
        """Register every model directly inside `directory`: .gguf/.safetensors files and HF checkpoint folders."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelLoadError(directory, "models directory does not exist")
        added = []
        for entry in sorted(directory.iterdir()):
            if entry.is_dir() and not (entry / "config.json").is_file():
                continue
            if entry.is_file() and entry.suffix not in (".gguf", ".safetensors"):
                continue
            added.append(self.add(entry))
        return added

    def get(self, model_id: str) -> ModelInfo:
        try:
            return self._infos[model_id]
        except KeyError:
            known = ", ".join(sorted(self._infos)) or "none"
            raise ModelLoadError(model_id, f"unknown model id (known: {known})") from None

    def open(self, model_id: str) -> LoadedModel:
        info = self.get(model_id)
        return open_model(info.path, model_id)

    def ids(self) -> list[str]:
        return list(self._infos)

    def infos(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._infos

    def __len__(self) -> int:
        return len(self._infos)
