"""Shared test setup: deterministic seeds and the CUDA marker."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as server/cli.py: read once, before torch loads
# The CPU backend's quantized matmuls without the start-up timing (~1 s per process, and noisy on a
# busy machine); tests/test_kernels_cpu_quant.py runs the measurement itself.
os.environ.setdefault("MINERVA_CPU_QGEMM", "1")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_logging():
    """`minerva serve` run in-process points its loggers at the stderr of that moment (a capture that
    closes with its test); later tests must not log into it."""
    loggers = [logging.getLogger(name) for name in ("minerva", "engine", "uvicorn.error")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved):
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
