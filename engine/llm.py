"""Offline batch generation for scripts: `LLM(path).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from typing import Any, cast

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import build_engine
from engine.outputs import RequestAccumulator, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer


class LLM:
    def __init__(self, model: str | None = None, **overrides: Any) -> None:
        self.engine = build_engine(EngineConfig(model=model, **overrides))
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine, llm._ids = engine, itertools.count()
        return llm

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion together; whole completions (deltas merged) in prompt order."""
        batch: list[str | list[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):  # one prompt (text or ids)
            batch = [prompts]
        else:
            batch = list(cast("list[str] | list[list[int]]", prompts))
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(batch)
        ids = [f"offline-{next(self._ids)}" for _ in batch]
        for request_id, prompt, p in zip(ids, batch, params_list):
            self.engine.add_request(request_id, prompt, p)
        merged = {request_id: RequestAccumulator() for request_id in ids}
        while self.engine.has_unfinished():
            for output in self.engine.step():
                merged[output.request_id].add(output)
        return [merged[i].result(i) for i in ids]
