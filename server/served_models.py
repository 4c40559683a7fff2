"""The models this server serves, by the name clients put in `model`, and their OpenAI model cards.

`ServedModels.resolve` is the one reader of the naming rule: a served name, else one of its aliases,
else (when the operator chose one with --fallback-model) the fallback model, else a 404.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.client import EngineClient
from server.errors import APIError

logger = logging.getLogger("minerva.server")


@dataclass
class ServedModel:
    name: str
    engine: EngineClient
    created: int  # the weight file's modification time, stable across restarts
    aliases: tuple[str, ...] = ()

    def card(self) -> dict[str, Any]:
        """OpenAI's model object plus the loader's metadata; never reads tensor data."""
        info = self.engine.model_info.to_dict()
        info.pop("path", None)  # server file paths are not the client's business
        info.pop("id", None)
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "minerva"}
        if self.aliases:
            card["aliases"] = list(self.aliases)
        card.update(info)
        # context_length is what a client may fill: the served context, which may be below what the model was
        # trained for (trained_context_length); clients that size prompts from it must not overfill.
        card["trained_context_length"] = info.get("context_length")
        card["context_length"] = card["max_model_len"] = self.engine.max_model_len
        stats = self.engine.stats()  # the KV cache of the whole tensor-parallel group, not one rank's
        card.update(kv_cache_tokens=stats.kv_cache_tokens, kv_cache_bytes=stats.kv_cache_bytes,
                    kv_cache_dtype=self.engine.describe().kv_cache_dtype,
                    tensor_parallel_size=stats.tensor_parallel_size, kernels=stats.kernels)
        return card


def file_created(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0


class ServedModels:
    """Name -> ServedModel; resolving an unknown name is OpenAI's 404 `model_not_found` unless a fallback is set.

    `aliases` maps further names to served names; `fallback` (a served name or alias) takes every other name.
    A bad alias target or fallback is a ValueError (the server refuses to start).
    """

    def __init__(self, engines: dict[str, EngineClient], aliases: dict[str, str] | None = None,
                 fallback: str | None = None) -> None:
        if not engines:
            raise ValueError("at least one engine must be served")
        aliases = aliases or {}
        for alias, target in aliases.items():
            if target not in engines or alias in engines:
                raise ValueError(f"alias {alias!r} must name a served model ({', '.join(engines)}) and not be one")
        self._models = {
            name: ServedModel(name, engine, file_created(engine.model_info.path),
                              tuple(alias for alias, target in aliases.items() if target == name))
            for name, engine in engines.items()
        }
        self._aliases = aliases
        self._fallback = self._known(fallback) if fallback is not None else None
        if fallback is not None and self._fallback is None:
            raise ValueError(f"--fallback-model {fallback!r} is not a served model name or alias "
                             f"(served: {', '.join(self._models)})")
        self._fallback_names: set[str] = set()  # names already logged as answered by the fallback

    def _known(self, name: str) -> ServedModel | None:
        return self._models.get(self._aliases.get(name, name))

    def resolve(self, name: str | None) -> ServedModel:
        if name is None:
            if len(self._models) == 1:
                return next(iter(self._models.values()))
            raise APIError(400, f"model is required: this server serves {', '.join(self._models)}", param="model")
        model = self._known(name)
        if model is not None:
            return model
        if self._fallback is not None:
            if name not in self._fallback_names and len(self._fallback_names) < 1024:
                self._fallback_names.add(name)
                logger.info("model %r is not served: answered by %r (--fallback-model)", name, self._fallback.name)
            return self._fallback
        raise APIError(404, f"The model `{name}` does not exist. Served models: {', '.join(self._models)}.",
                       param="model", code="model_not_found")

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)
