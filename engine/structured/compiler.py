"""Grammar compilation: one xgrammar TokenizerInfo per model, one compiled grammar per distinct schema (cached).

Compiling takes milliseconds to seconds depending on the schema, so the server compiles
in a worker thread before it adds the request; the engine then finds the grammar cached
and its step loop never waits on a compiler.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema the grammar engine cannot compile (invalid JSON Schema or an unsupported feature)."""


class GrammarCompiler:
    """Thread-safe, LRU-bounded cache of compiled grammars for one tokenizer and logits width."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = 256) -> None:
        import xgrammar  # imported here: servers that never constrain output never pay its import

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(_tokenizer_info(xgrammar, tokenizer, vocab_size))
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._max_cached = max_cached

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar for `spec`; raises GrammarError with xgrammar's reason."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if spec.kind == "json_object":
                compiled = self._compiler.compile_json_schema('{"type": "object"}', strict_mode=False)
            elif spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.schema or "")
            elif spec.kind == "lark":
                compiled = self._compiler.compile_lark(spec.schema or "")
            else:
                compiled = self._compiler.compile_json_schema(spec.schema or "{}", any_whitespace=False)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/its own types for bad schemas
            raise GrammarError(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__) from exc
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> "GrammarMatcher":
        from engine.structured.matcher import GrammarMatcher

        return GrammarMatcher(self._xgr.GrammarMatcher(self.compile(spec)))


def _tokenizer_info(xgr: Any, tokenizer: Tokenizer, vocab_size: int) -> Any:
    """Token strings as the backend stores them; special tokens as "" so that no grammar ever allows them."""
    backend = tokenizer.backend
    special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
    stops = set(tokenizer.eos_token_ids)
    vocab = ["" if i in special and i not in stops else (backend.id_to_token(i) or "")
             for i in range(backend.get_vocab_size(with_added_tokens=True))]
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(vocab, xgr.VocabType(metadata["vocab_type"]), vocab_size=vocab_size,
                             stop_token_ids=sorted(stops), add_prefix_space=metadata["add_prefix_space"])
