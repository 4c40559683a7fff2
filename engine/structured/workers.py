"""Grammar compiles in worker processes that can be killed.

xgrammar compiles in native code that nothing can interrupt: a 30k-string enum took 14-44 s (a
50k one ~316 s), and in the server's thread pool such a compile held a pool thread and a core for
as long as it ran, with 8 compiler threads on 2 cores (issue 23, audit 1). Here a compile runs in
one of a few worker processes with one compiler thread, so running streams keep their cores; past its
deadline (queueing included) or when its request goes away, the worker is killed and the caller
gets GrammarTimeout or GrammarCancelled; the next compile starts a fresh worker.

Protocol over the worker's pipes, one JSON document per line: the parent sends the serialized
xgrammar TokenizerInfo, the worker answers {"ready": true}; then each {"kind", "schema"} is
answered with {"grammar": serialized CompiledGrammar} or {"error": reason}.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from engine.errors import GrammarError

WORKER_START_TIMEOUT_S = 120.0  # importing xgrammar (and torch) on a loaded machine; not counted as compile time
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")  # "[01:10:10] /project/cpp/x.cc:5082: "


class GrammarTimeout(GrammarError):
    """The compile did not finish within the operator's limit; its worker was killed."""


class GrammarCancelled(GrammarError):
    """The request went away while its grammar compiled; its worker was killed."""


class WorkerDied(RuntimeError):
    """The worker process ended without answering (killed from outside, out of memory)."""


def clean_reason(text: str) -> str:
    """xgrammar's first error line without its timestamp and source path."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _XGRAMMAR_PREFIX.sub("", first).strip()


class CompileWorker:
    """One worker process, started on first use; `compile` kills it on a deadline or a cancel."""

    def __init__(self, tokenizer_info_json: str) -> None:
        self._tokenizer_info_json = tokenizer_info_json
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def compile(self, kind: str, schema: str | None, deadline: float, cancelled: threading.Event | None) -> str:
        """The serialized CompiledGrammar; GrammarError for a bad schema, GrammarTimeout past `deadline`."""
        if self._process is None or self._process.poll() is not None:
            starting = time.monotonic()
            self._start()
            deadline += time.monotonic() - starting  # a worker's start-up is not the schema's compile time
        self._send({"kind": kind, "schema": schema})
        reply = self._receive(deadline, cancelled)
        if "error" in reply:
            raise GrammarError(reply["error"])
        grammar: str = reply["grammar"]  # the worker's reply (main(), below)
        return grammar

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
        self._buffer = b""

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-c", "from engine.structured.workers import main; main()"]
        self._process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=root)
        self._buffer = b""
        self._send_raw(self._tokenizer_info_json)
        self._receive(time.monotonic() + WORKER_START_TIMEOUT_S, None)

    def _send(self, message: dict[str, Any]) -> None:
        self._send_raw(json.dumps(message))

    def _send_raw(self, line: str) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            self._process.stdin.write(line.encode() + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError as exc:
            self.close()
            raise WorkerDied("the grammar worker exited") from exc

    def _receive(self, deadline: float, cancelled: threading.Event | None) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            if cancelled is not None and cancelled.is_set():
                self.close()
                raise GrammarCancelled("the request was cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise GrammarTimeout("timed out")
            ready, _, _ = select.select([fd], [], [], min(left, 0.05))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.close()
                    raise WorkerDied("the grammar worker exited")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)  # one JSON object per line (main(), below)
        return reply


class WorkerPool:
    """A fixed number of CompileWorkers; a compile waits for a free one within its own deadline."""

    def __init__(self, tokenizer_info_json: str, size: int) -> None:
        self._idle = [CompileWorker(tokenizer_info_json) for _ in range(size)]
        self._free = threading.Condition()

    def compile(self, kind: str, schema: str | None, timeout_s: float,
                cancelled: threading.Event | None = None) -> str:
        deadline = time.monotonic() + timeout_s
        worker = self._take(deadline, cancelled)
        try:
            try:
                return worker.compile(kind, schema, deadline, cancelled)
            except WorkerDied:  # one retry on a fresh worker: a worker killed from outside is not the schema's fault
                try:
                    return worker.compile(kind, schema, deadline, cancelled)
                except WorkerDied as exc:
                    raise GrammarError("the grammar compiler crashed on this schema") from exc
        finally:
            with self._free:
                self._idle.append(worker)
                self._free.notify()

    def _take(self, deadline: float, cancelled: threading.Event | None) -> CompileWorker:
        with self._free:
            while not self._idle:
                if cancelled is not None and cancelled.is_set():
                    raise GrammarCancelled("the request was cancelled")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GrammarTimeout("timed out waiting for a grammar worker")
                self._free.wait(min(left, 0.05))
            return self._idle.pop()

    def close(self) -> None:
        with self._free:
            for worker in self._idle:
                worker.close()


def _serve(requests: IO[str], replies: IO[str]) -> None:
    """The worker's loop: one TokenizerInfo, then one compile per request line."""
    import xgrammar

    info = xgrammar.TokenizerInfo.deserialize_json(requests.readline())
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        try:
            if request["kind"] == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', strict_mode=False)
            elif request["kind"] == "regex":
                compiled = compiler.compile_regex(request["schema"] or "")
            elif request["kind"] == "lark":
                compiled = compiler.compile_lark(request["schema"] or "")
            else:
                compiled = compiler.compile_json_schema(request["schema"] or "{}", any_whitespace=False)
            reply = {"grammar": compiled.serialize_json()}
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError/its own types for bad schemas
            reply = {"error": clean_reason(str(exc)) or type(exc).__name__}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    """The worker process's entry point."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints from libraries stay off the protocol pipe
    try:
        _serve(sys.stdin, protocol)
    except KeyboardInterrupt:  # the server's Ctrl-C reaches its whole process group
        pass
