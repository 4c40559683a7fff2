"""Grammar compilation: one xgrammar TokenizerInfo per model, one compiled grammar per distinct schema (cached).

Compiles run in killable worker processes (engine/structured/workers.py) under a time limit; the
server awaits `compile_async` before it adds the request, so the engine finds the grammar cached
and its step loop never waits on a compiler. The cache is bounded in bytes (xgrammar reports each
grammar's size), since distinct schemas from clients are unbounded in number and size; the bound may
be passed only by grammars used in the last KEEP_RECENT_S (at most what the workers compile meanwhile).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from engine.structured.spec import StructuredOutput
from engine.structured.workers import GrammarTimeout, WorkerPool
from engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar

    from engine.config import EngineConfig
    from engine.structured.matcher import GrammarMatcher

WORKERS = 2  # compiles at once; more queue (within their deadline)
WAITERS = 64  # threads that only wait on a worker's pipe, apart from asyncio's shared pool
KEEP_RECENT_S = 10.0  # grammars used this recently stay cached over the byte bound (see _remember)


class GrammarCompiler:
    """Thread-safe cache of compiled grammars for one tokenizer and logits width, bounded by `cache_bytes`."""

    @classmethod
    def for_engine(cls, tokenizer: Tokenizer, vocab_size: int, config: EngineConfig) -> GrammarCompiler:
        """With the engine config's compile time limit and cache size (--grammar-compile-timeout-s, --grammar-cache-mib)."""
        return cls(tokenizer, vocab_size, timeout_s=config.grammar_compile_timeout_s,
                   cache_bytes=int(config.grammar_cache_mib * (1 << 20)))

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, timeout_s: float = 5.0,
                 cache_bytes: int = 256 << 20) -> None:
        import xgrammar  # imported here: servers that never constrain output never pay its import

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self.cache_bytes = cache_bytes
        self._info = _tokenizer_info(tokenizer, vocab_size)
        self._workers = WorkerPool(self._info.serialize_json(), WORKERS)
        self._waiters = ThreadPoolExecutor(WAITERS, thread_name_prefix="minerva-grammar")
        self._cache: OrderedDict[StructuredOutput, tuple[xgrammar.CompiledGrammar, float]] = OrderedDict()  # (grammar, last used)
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutput, cancelled: threading.Event | None = None) -> xgrammar.CompiledGrammar:
        """The compiled grammar for `spec`; GrammarError with the reason, GrammarTimeout past the limit."""
        with self._lock:
            if spec in self._cache:
                compiled, _ = self._cache.pop(spec)
                self._cache[spec] = compiled, time.monotonic()
                return compiled
        try:
            serialized = self._workers.compile(spec.kind, spec.schema, self.timeout_s, cancelled)
        except GrammarTimeout as exc:
            raise GrammarTimeout(f"compiling it took longer than the server's limit of {self.timeout_s:g} s "
                                 "(--grammar-compile-timeout-s)") from exc
        compiled = self._xgr.CompiledGrammar.deserialize_json(serialized, self._info)
        self._remember(spec, compiled)
        return compiled

    async def compile_async(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """`compile` on this compiler's own waiting threads; cancelling the caller kills the compile."""
        cancelled = threading.Event()
        future = asyncio.get_running_loop().run_in_executor(self._waiters, self.compile, spec, cancelled)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def matcher(self, spec: StructuredOutput) -> "GrammarMatcher":
        from engine.structured.matcher import GrammarMatcher

        return GrammarMatcher(self._xgr.GrammarMatcher(self.compile(spec)))

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def close(self) -> None:
        self._workers.close()
        self._waiters.shutdown(wait=False, cancel_futures=True)

    def _remember(self, spec: StructuredOutput, compiled: xgrammar.CompiledGrammar) -> None:
        """Cache it, dropping the least recently used beyond the byte bound, but none used in the last
        KEEP_RECENT_S: the server compiles just before it adds the request, and a grammar evicted in between
        would be compiled again by the engine, on the event loop."""
        now = time.monotonic()
        with self._lock:
            if spec in self._cache:
                return
            self._cache[spec] = compiled, now
            self._cached_bytes += compiled.memory_size_bytes
            while self._cached_bytes > self.cache_bytes:
                oldest, (dropped, used) = next(iter(self._cache.items()))
                if used > now - KEEP_RECENT_S:
                    break
                del self._cache[oldest]
                self._cached_bytes -= dropped.memory_size_bytes


def _tokenizer_info(tokenizer: Tokenizer, vocab_size: int) -> xgrammar.TokenizerInfo:
    """Token strings as the backend stores them; special tokens as "" so that no grammar ever allows them."""
    import xgrammar  # the caller has imported it already

    backend = tokenizer.backend
    special = {i for i, added in backend.get_added_tokens_decoder().items() if added.special}
    stops = set(tokenizer.eos_token_ids)
    vocab = ["" if i in special and i not in stops else (backend.id_to_token(i) or "")
             for i in range(backend.get_vocab_size(with_added_tokens=True))]
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgrammar.TokenizerInfo(vocab, xgrammar.VocabType(metadata["vocab_type"]), vocab_size=vocab_size,
                                  stop_token_ids=sorted(stops), add_prefix_space=metadata["add_prefix_space"])
