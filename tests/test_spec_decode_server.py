"""`--speculative-config` end to end: the flag and the TOML key reach the engine, a served completion is the
same text with and without speculation (checked through the official openai client), and /metrics and
the request log report what was drafted and accepted."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.config import ConfigError, EngineConfig
from server.app import create_app
from server.cli import build_parser
from server.launch import engine_configs
from server_fixtures import LiveServer, request_logs, save_tiny_llama, wait_until_idle

pytestmark = pytest.mark.timeout(180)
SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}'
PROMPT = "one two one two one two one two"


def test_the_flag_and_the_config_file_set_speculation(tmp_path):
    (config,) = engine_configs(build_parser().parse_args(["serve", "m", "--speculative-config", SPEC]))
    assert (config.speculative_config.method, config.speculative_config.num_speculative_tokens) == ("ngram", 4)
    toml = tmp_path / "engine.toml"
    toml.write_text('[engine]\nspeculative_config = {method = "suffix", suffix_decoding_max_tree_depth = 16}\n')
    (config,) = engine_configs(build_parser().parse_args(["serve", "m", "--config", str(toml)]))
    assert config.speculative_config.suffix_decoding_max_tree_depth == 16
    with pytest.raises(ConfigError, match="method"):
        engine_configs(build_parser().parse_args(["serve", "m", "--speculative-config", '{"method": "eagle"}']))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("spec") / "tiny")
    engines = {name: AsyncEngine.from_config(EngineConfig(
        model=str(model_dir), served_model_name=name, device="cpu", dtype="float32", kernel_backend="torch",
        kv_cache_gib=0.02, speculative_config=spec)) for name, spec in (("plain", None), ("spec", SPEC))}
    # verify every draft: these tests count drafts, and the tiny model's measured step cost prices them out under load
    engines["spec"].engine.spec.step_cost = None
    server = LiveServer(create_app(engines))
    server.engines = engines
    yield server
    server.stop()


def test_served_text_is_the_same_and_metrics_count_drafts(served, caplog):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = {}
    caplog.set_level(logging.INFO, logger="minerva.requests")  # for the whole test: a line may come after the stream
    for name in ("plain", "spec"):
        texts[name] = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
        stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == texts[name]
    assert texts["spec"] == texts["plain"] and texts["plain"]
    assert wait_until_idle(served.engines["spec"]).kv_blocks_used == 0
    metrics = httpx.get(served.base_url + "/metrics").text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
             if line.startswith("minerva_spec_decode")}
    drafted = lines['minerva_spec_decode_num_draft_tokens_total{model="spec"}']
    accepted = lines['minerva_spec_decode_num_accepted_tokens_total{model="spec"}']
    assert drafted > 0 and 0 <= accepted <= drafted  # the tiny random model rarely repeats itself: few accepted
    per_position = [lines[f'minerva_spec_decode_num_accepted_tokens_per_pos_total{{model="spec",position="{j}"}}']
                    for j in range(4)]
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)
    assert not any('model="plain"' in key for key in lines)  # speculation off: no series
    logged = request_logs(caplog, 2, model="spec")
    assert len(logged) == 2 and all(f["spec_draft_tokens"] >= f["spec_accepted_tokens"] for f in logged)
    assert sum(f["spec_draft_tokens"] for f in logged) == drafted
    assert sum(f["spec_accepted_tokens"] for f in logged) == accepted


def test_a_json_schema_request_speculates_and_writes_the_same_text(served, caplog):
    """Structured output (the official client's json_schema response format) verifies drafts checked against
    its grammar; the served text is the same as without speculation."""
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    schema = {"type": "object", "properties": {"path": {"type": "string"}, "line": {"type": "integer"}},
              "required": ["path", "line"], "additionalProperties": False}
    messages = [{"role": "user", "content": 'Repeat: {"path": "src/app.py", "line": 12} {"path": "src/app.py", '
                                            '"line": 12} {"path": "src/app.py", "line": 12}'}]
    texts = {}
    caplog.set_level(logging.INFO, logger="minerva.requests")
    for name in ("plain", "spec"):
        texts[name] = client.chat.completions.create(
            model=name, messages=messages, max_tokens=40, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema,
                                                                    "strict": True}}).choices[0].message.content
    assert texts["spec"] == texts["plain"] and texts["plain"].startswith("{")
    logged = request_logs(caplog, model="spec")
    assert len(logged) == 1 and logged[0]["spec_draft_tokens"] > 0
    assert wait_until_idle(served.engines["spec"]).kv_blocks_used == 0
