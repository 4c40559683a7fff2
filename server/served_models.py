"""The models this server serves, by the name clients put in `model`, and their OpenAI model cards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from engine.client import EngineClient
from server.errors import APIError


@dataclass
class ServedModel:
    name: str
    engine: EngineClient
    created: int  # the weight file's modification time, stable across restarts

    def card(self) -> dict[str, Any]:
        """OpenAI's model object plus the loader's metadata; never reads tensor data."""
        info = self.engine.model_info.to_dict()
        info.pop("path", None)  # server file paths are not the client's business
        info.pop("id", None)
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "minerva"}
        card.update(info)
        card["max_model_len"] = self.engine.max_model_len
        stats = self.engine.stats()  # the KV cache of the whole tensor-parallel group, not one rank's
        card.update({key: stats[key] for key in ("kv_cache_tokens", "kv_cache_bytes", "tensor_parallel_size")
                     if key in stats})
        return card


def file_created(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0


class ServedModels:
    """Name -> ServedModel; resolving an unknown name is OpenAI's 404 `model_not_found`."""

    def __init__(self, engines: dict[str, EngineClient]) -> None:
        if not engines:
            raise ValueError("at least one engine must be served")
        self._models = {
            name: ServedModel(name, engine, file_created(engine.model_info.path)) for name, engine in engines.items()
        }

    def resolve(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise APIError(400, f"model is required: this server serves {', '.join(self._models)}", param="model")
        try:
            return self._models[name]
        except KeyError:
            raise APIError(404, f"The model `{name}` does not exist. Served models: {', '.join(self._models)}.",
                           param="model", code="model_not_found") from None

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
