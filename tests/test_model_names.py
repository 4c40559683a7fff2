"""Names agents send: several served names for one model (aliases) and an operator-chosen fallback for
unknown names (Claude Code asks for claude-* ids), off by default; /v1/models lists the real names."""

from __future__ import annotations

from types import SimpleNamespace

import anthropic
import openai
import pytest

from server.app import create_app
from server.engine_args import LaunchError
from server.errors import APIError
from server.launch import engine_configs, server_settings
from server.served_models import ServedModels
from server.settings import ServerSettings
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine
from test_server_cli import parse

pytestmark = pytest.mark.timeout(300)


def fake_engine():
    return SimpleNamespace(model_info=SimpleNamespace(path=""))


def test_served_model_name_takes_aliases_after_commas():
    args = parse("a.gguf", "b.gguf", "--served-model-name", "gpt-oss, claude-sonnet-4-5,claude-haiku-4-5",
                 "--served-model-name", "small", "--fallback-model", "small")
    assert [c.served_model_name for c in engine_configs(args)] == ["gpt-oss", "small"]
    settings = server_settings(args)
    assert settings.model_aliases == (("claude-sonnet-4-5", "gpt-oss"), ("claude-haiku-4-5", "gpt-oss"))
    assert settings.fallback_model == "small"
    assert server_settings(parse("a.gguf")).fallback_model is None  # off by default
    for bad in (["--served-model-name", "x,x"], ["--served-model-name", "x,"]):
        with pytest.raises(LaunchError):
            engine_configs(parse("a.gguf", *bad))
    with pytest.raises(LaunchError, match="distinct"):
        engine_configs(parse("a", "b", "--served-model-name", "x,y", "--served-model-name", "y"))


def test_resolution_order_name_alias_fallback_else_404():
    models = ServedModels({"big": fake_engine(), "small": fake_engine()}, {"claude-opus": "big"}, fallback="small")
    assert models.resolve("big").name == "big"
    assert models.resolve("claude-opus").name == "big"
    assert models.resolve("claude-haiku-4-5-20251001").name == "small"
    assert [m.aliases for m in models] == [("claude-opus",), ()]
    strict = ServedModels({"big": fake_engine()}, {"claude-opus": "big"})
    with pytest.raises(APIError) as missing:
        strict.resolve("claude-haiku")
    assert (missing.value.status, missing.value.code) == (404, "model_not_found")
    assert ServedModels({"big": fake_engine()}, {"b": "big"}, fallback="b").resolve("other").name == "big"
    for aliases, fallback in (({"x": "nope"}, None), ({"big": "big"}, None), ({}, "nope")):
        with pytest.raises(ValueError):
            ServedModels({"big": fake_engine()}, aliases, fallback)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("names") / "tiny"), "tiny")
    server = LiveServer(create_app({"tiny": engine}, ServerSettings(model_aliases=(("gpt-4o", "tiny"),),
                                                                    fallback_model="tiny")))
    yield server
    server.stop()


def test_aliases_and_fallback_answer_through_both_apis(live):
    claude = anthropic.Anthropic(base_url=live.base_url, api_key="unused", max_retries=0, timeout=120)
    message = claude.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=3,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.model == "tiny" and message.usage.output_tokens > 0
    chat = openai.OpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    completion = chat.chat.completions.create(model="gpt-4o", max_tokens=2,
                                              messages=[{"role": "user", "content": "hi"}])
    assert completion.model == "tiny"
    listed = chat.models.list().data
    assert [m.id for m in listed] == ["tiny"] and listed[0].model_extra["aliases"] == ["gpt-4o"]
    assert chat.models.retrieve("gpt-4o").id == "tiny"
