"""`minerva serve --api-server-count N`: N API server processes on one port against one engine core per model.

This process is the launcher: it starts each model's engine core (engine.client.CoreProcess), binds the
port once and spawns N API processes that all accept on that one listening socket (the kernel hands each
connection to one of them), each with its own event loop, GIL and client of every core. HTTP parsing,
validation, chat templates and SSE thus spread over N processes while one core steps.

Faults: a core dying ends every open stream in every API process with an error event; each API process
then drains and exits 1, and so does the launcher. An API process dying loses only its own connections:
the launcher tells the cores (`client_gone`, which aborts its requests and frees their blocks) and the
others keep serving; with none left the launcher stops the cores and exits 1. SIGTERM or SIGINT to the
launcher drains every API process (each ends what is still open at --shutdown-timeout), then stops the
cores. Metrics: the API processes count HTTP traffic in prometheus_client's multiprocess mode (a
directory of their own, summed by whichever process answers a scrape); engine figures come from the
core, the same in each. Request logs: each process writes its own lines to the shared stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from types import FrameType

from engine.client import CoreAddress, CoreProcess, EngineClient, connect_engine
from engine.config import EngineConfig
from engine.errors import EngineCoreError, MinervaError
from server.engine_args import LaunchError
from server.observability.metrics import MULTIPROCESS_DIR
from server.observability.request_log import configure_json_logging
from server.settings import ServerSettings

log = logging.getLogger("minerva.server")

KILL_AFTER_S = 15.0  # past --shutdown-timeout, an API process that has not exited is killed


def serve_api_servers(args: argparse.Namespace, configs: list[EngineConfig], settings: ServerSettings) -> int:
    """Start the cores and the API processes, watch them, and return the exit status (1 if anything died)."""
    from server.serving import uvicorn_config

    cores: list[CoreProcess] = []
    metrics_dir = tempfile.mkdtemp(prefix="minerva-metrics-")
    os.environ[MULTIPROCESS_DIR] = metrics_dir  # read by prometheus_client as each spawned API process imports it
    try:
        for config in configs:
            try:
                cores.append(CoreProcess.start(config))
            except EngineCoreError as exc:
                raise LaunchError(f"{config.model or 'the default model'}: {exc}") from exc
        listening = uvicorn_config(None, args).bind_socket()
        spawn = multiprocessing.get_context("spawn")
        processes = [spawn.Process(target=run_api_process, name=f"minerva-api-{index}",
                                   args=(index, args, configs, [core.address for core in cores], settings, listening))
                     for index in range(args.api_server_count)]
        for process in processes:
            process.start()
        listening.close()  # the API processes hold it now
        return Supervisor(processes, cores, args.shutdown_timeout).run()
    finally:
        for core in cores:
            core.stop()
        os.environ.pop(MULTIPROCESS_DIR, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)


class Supervisor:
    """Waits on the API processes and the cores; forwards SIGTERM/SIGINT to the API processes as one SIGTERM."""

    def __init__(self, processes: Sequence[multiprocessing.process.BaseProcess], cores: list[CoreProcess],
                 shutdown_timeout_s: float) -> None:
        self.running = {process.sentinel: (index, process) for index, process in enumerate(processes)}
        self.cores = {os.pidfd_open(core.process.pid): core for core in cores}
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while self.running:
                ready = multiprocessing.connection.wait([*self.running, *self.cores],
                                                        timeout=None if not self.stopping else self._grace())
                if not ready:  # past the shutdown grace: what is left is killed
                    for _, process in self.running.values():
                        process.kill()
                for sentinel in ready:
                    if sentinel in self.cores:
                        self._core_died(sentinel)
                    elif sentinel in self.running:
                        self._api_exited(sentinel)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for pidfd in self.cores:
                os.close(pidfd)
        return 1 if self.failed else 0

    def _grace(self) -> float:
        return self.shutdown_timeout_s + KILL_AFTER_S

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("stopping %d API server process(es)", len(self.running))
        self.stopping = True
        for _, process in self.running.values():
            if process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def _core_died(self, pidfd: int) -> None:
        core = self.cores.pop(pidfd)
        os.close(pidfd)
        log.critical("the engine core process %s: the API server processes drain and exit", core.exit_status())
        self.failed = True
        self.stopping = True  # each API process sees it itself (its streams end with an error) and exits 1

    def _api_exited(self, sentinel: int) -> None:
        index, process = self.running.pop(sentinel)
        process.join()
        if process.exitcode != 0:
            self.failed = True
        if self.stopping:
            return
        name = api_name(index)
        log.error("API server process %s exited with status %s; %d other(s) keep serving", name, process.exitcode,
                  len(self.running))
        for core in self.cores.values():
            core.client_gone(name)  # its requests stop and free their blocks
        if not self.running:
            self.stopping = True


def api_name(index: int) -> str:
    return f"api-{index}"


def run_api_process(index: int, args: argparse.Namespace, configs: list[EngineConfig], cores: list[CoreAddress],
                    settings: ServerSettings, listening: socket.socket) -> None:
    """One API server process (spawned): a client of every core, the app, uvicorn on the shared socket."""
    from server.serving import add_served, defer_to_engine_cores, device_name, serve_app

    os.setpgrp()  # a terminal's Ctrl-C reaches the launcher alone, which drains this process once
    defer_to_engine_cores()
    configure_json_logging(args.log_level)
    try:
        engines: dict[str, EngineClient] = {}
        for config, core in zip(configs, cores):
            add_served(engines, config, connect_engine(config, core, api_name(index)))
        settings = dataclasses.replace(settings, device_name=device_name(engines))
        status = serve_app(engines, settings, args, banner=index == 0, sockets=[listening])
    except MinervaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    raise SystemExit(status)
