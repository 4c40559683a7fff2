"""engine/structured: compiles in killable worker processes, under a time limit, cached within a byte bound."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.structured import GrammarCompiler, GrammarError, GrammarTimeout, StructuredOutput
from engine.structured.workers import clean_reason
from engine.tokenizer import Tokenizer
from server_fixtures import save_tokenizer

pytestmark = pytest.mark.timeout(300)


def enum_schema(count: int, tag: str = "") -> StructuredOutput:
    return StructuredOutput.from_schema({"type": "object", "properties": {
        "x": {"enum": [f"value{tag}-{i}-{i * 7919 % 10007}" for i in range(count)]}}})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    vocab = save_tokenizer(directory)
    return Tokenizer.from_files({name: directory / name for name in ("tokenizer.json", "tokenizer_config.json")}), vocab


@pytest.fixture
def compiler(tokenizer):
    compiler = GrammarCompiler(*tokenizer, timeout_s=1.0, cache_bytes=2 << 20)
    compiler.compile(StructuredOutput.json_object())  # the worker's start-up is not compile time
    yield compiler
    compiler.close()


def test_a_compile_past_the_limit_is_killed_and_the_next_one_works(compiler):
    started = time.monotonic()
    with pytest.raises(GrammarTimeout, match=r"limit of 1 s \(--grammar-compile-timeout-s\)"):
        compiler.compile(enum_schema(10_000))
    assert time.monotonic() - started < 3.0
    matcher = compiler.matcher(StructuredOutput.from_schema({"type": "integer"}))
    assert not matcher.terminated


def test_bad_schema_reason_names_no_source_path(compiler):
    with pytest.raises(GrammarError) as caught:
        compiler.compile(StructuredOutput.from_schema({"type": "objekt"}))
    assert "objekt" in str(caught.value) and ".cc" not in str(caught.value) and "[" not in str(caught.value)
    assert clean_reason("[01:10:10] /project/cpp/json_schema_converter.cc:5082: Unsupported type \"x\"\n") == \
        'Unsupported type "x"'


def test_cache_is_bounded_in_bytes(compiler, monkeypatch):
    import engine.structured.compiler as compiler_module

    monkeypatch.setattr(compiler_module, "KEEP_RECENT_S", 0.0)
    for tag in "abc":
        compiler.compile(enum_schema(2000, tag))  # ~1.5 MB each against a 2 MiB bound
    assert 1 << 20 < compiler.cached_bytes <= 2 << 20  # the newest stays, older ones went


def test_grammars_just_compiled_stay_until_the_engine_takes_them(compiler, monkeypatch):
    import engine.structured.compiler as compiler_module

    monkeypatch.setattr(compiler_module, "KEEP_RECENT_S", 600.0)  # "recent" on a machine of any load
    specs = [enum_schema(2000, tag) for tag in "de"]
    for spec in specs:
        compiler.compile(spec)
    assert compiler.cached_bytes > 2 << 20  # over the bound, but both are recent
    started = time.monotonic()
    for spec in specs:
        compiler.matcher(spec)  # cache hits: nothing compiles (a compile takes a worker round trip)
    assert time.monotonic() - started < 5.0 and compiler.cached_bytes > 2 << 20


def test_cancelling_the_caller_kills_the_compile(compiler):
    async def cancel_midway() -> None:
        task = asyncio.ensure_future(compiler.compile_async(enum_schema(10_000, "cancel")))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    compiler.timeout_s = 60.0
    asyncio.run(cancel_midway())
    started = time.monotonic()  # the worker was free again at once: a small compile does not wait 60 s
    compiler.compile(StructuredOutput.from_schema({"type": "boolean"}))
    assert time.monotonic() - started < 30.0


def test_a_worker_killed_from_outside_is_replaced(compiler):
    for worker in compiler._workers._idle:
        if worker._process is not None:
            worker._process.kill()
            worker._process.wait()
    assert compiler.compile(StructuredOutput.from_schema({"type": "string"})) is not None


def test_concurrent_compiles_queue_within_their_deadline(compiler):
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            compiler.compile(enum_schema(10_000, threading.current_thread().name))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=slow, name=f"t{i}") for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(errors) == 4 and all(isinstance(error, GrammarTimeout) for error in errors)
