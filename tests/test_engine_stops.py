"""EOS, stop token ids and min_tokens through LLMEngine with the fake paged model."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.builder import engine_for_model
from engine.sampling_params import SamplingParams
from tests.engine_testing import assert_idle, run_to_completion
from tests.fake_model import FakeModel, next_token
from tests.test_scheduler import IdTokenizer

PROMPT = [1, 2, 3]
FIRST = next_token(PROMPT, 97)


def _engine(eos: list[int]) -> LLMEngine:
    tokenizer = IdTokenizer()
    tokenizer.eos_token_ids = eos
    return engine_for_model(FakeModel(), tokenizer, EngineConfig(block_size=4), max_model_len=64, num_blocks=32)


def test_eos_stops_and_min_tokens_bans_it():
    engine = _engine([FIRST])
    engine.add_request("eos", PROMPT, SamplingParams(temperature=0, max_tokens=5))
    engine.add_request("min", PROMPT, SamplingParams(temperature=0, max_tokens=5, min_tokens=2))
    engine.add_request("ignore", PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outs = run_to_completion(engine)
    eos = outs["eos"].outputs[0]
    assert eos.token_ids == [FIRST] and eos.finish_reason == "stop" and eos.stop_reason is None and eos.text == ""
    assert outs["min"].outputs[0].token_ids[0] != FIRST and len(outs["min"].outputs[0].token_ids) >= 2
    assert outs["ignore"].outputs[0].token_ids[0] == FIRST and outs["ignore"].outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_stop_token_ids_report_the_id():
    engine = _engine([])
    second = next_token(PROMPT + [FIRST], 97)
    engine.add_request("s", PROMPT, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[second]))
    out = run_to_completion(engine)["s"].outputs[0]
    assert out.token_ids == [FIRST, second] and out.stop_reason == second and out.text == f"<{FIRST}>"
    assert_idle(engine)
