"""AsyncEngine and ProcessEngineClient (--engine-process) satisfy EngineClient, the server's only view of an engine."""

from __future__ import annotations

import inspect

import pytest

from engine.async_engine import AsyncEngine
from engine.client import EngineClient
from engine.process_client import ProcessEngineClient

MEMBERS = [name for name in vars(EngineClient) if not name.startswith("_")]


def test_protocol_names_what_the_server_uses():
    assert {"tokenizer", "model_info", "max_model_len", "describe", "stats", "compile_structured", "generate", "abort",
            "end_requests", "start", "shutdown"} <= set(MEMBERS)
    assert set(EngineClient.__annotations__) == {"failure", "on_fatal"}


@pytest.mark.parametrize("client", [AsyncEngine, ProcessEngineClient])
@pytest.mark.parametrize("name", MEMBERS)
def test_clients_have_each_member_in_its_kind(name, client):
    expected, got = vars(EngineClient)[name], inspect.getattr_static(client, name, None)
    assert got is not None, f"{client.__name__} has no {name}"
    if isinstance(expected, property):
        assert isinstance(got, property)
        return
    assert inspect.signature(got).parameters.keys() == inspect.signature(expected).parameters.keys()
    assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(expected)
    if name == "generate":  # the protocol says "returns an async iterator"; both are async generators
        assert inspect.isasyncgenfunction(got)


def test_async_engine_sets_the_attributes():
    engine = AsyncEngine(engine=None)  # the LLMEngine is only stored
    for name in EngineClient.__annotations__:
        assert hasattr(engine, name)
