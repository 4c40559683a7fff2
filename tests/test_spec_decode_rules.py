"""Rows with per-token rules speculate and still draw what non-speculative decoding draws.

A grammar's drafts are cut at the first token it rejects and each verified position is masked with the
grammar's state after the drafts before it; a penalised row counts the drafts before it; n > 1 samples
speculate each on their own. A model that copies a script through the paged KV cache (its context read
back through the block tables), with the tiny Llama's real tokenizer so xgrammar compiles real
grammars, makes the drafts land often and miss sometimes; every case (a seeded sampling grammar row too)
runs in one batch beside plain rows, with and without speculation, and must come out token for token the
same with every block back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.builder import engine_for_model
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.structured import GrammarCompiler, unconstrained_bitmask
from engine.structured.spec import StructuredOutput
from engine.tokenizer import Tokenizer
from tests.engine_testing import assert_idle, run_to_completion, tiny_llama_dir
from tests.fake_model import FakeModel

NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
CHOICE = "(yes|no|maybe)(, (yes|no|maybe))*"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "path": {"type": "string"}},
          "required": ["name", "path"]}
# (prompt, what the model writes): each output repeats most of its prompt, with changes the drafts miss.
SCRIPTS = {
    "json": ('Copy: {"name": "main", "path": "src/app/main.py", "size": 12} {"name": "test", "path": "src/app/test.py"}',
             '{"name": "main", "path": "src/app/test.py", "size": 12}'),  # the schema has no "size": "}" instead
    # The prompt's ", size" after a path is what the n-gram proposer drafts there; the schema allows only "}".
    "json-cut": ('{"name": "a", "path": "b/c.py", "size": 3} {"name": "a", "path": "b/c.py", "size": 4}',
                 '{"name": "a", "path": "b/c.py"}'),
    "choice": ("yes, no, yes, no, maybe, yes, no, yes", "yes, no, yes, no, yes, no, perhaps, maybe"),
    "penalised": ("one two three one two three one two three", "one two three one two three one two three one two"),
    "plain": ("The quick brown fox jumps over the lazy dog. The quick brown fox",
              " jumps over the lazy dog. The quick brown fox jumps over"),
}


def requests() -> list[tuple[str, str, SamplingParams]]:
    """(request id, its script, its parameters)."""
    json_schema = StructuredOutput.from_schema(SCHEMA)
    return [
        ("json", "json", SamplingParams(temperature=0, max_tokens=60, structured=json_schema)),
        ("json-seeded", "json", SamplingParams(temperature=0.5, seed=11, max_tokens=60, structured=json_schema)),
        ("json-cut", "json-cut", SamplingParams(temperature=0, max_tokens=60, structured=json_schema)),
        ("choice", "choice", SamplingParams(temperature=0, max_tokens=40, structured=StructuredOutput.from_grammar(
            "regex", CHOICE))),
        ("penalised", "penalised", SamplingParams(temperature=0, max_tokens=40, frequency_penalty=1.0,
                                                  presence_penalty=0.5, repetition_penalty=1.2, ignore_eos=True)),
        ("plain", "plain", SamplingParams(temperature=0, max_tokens=30, n=2, ignore_eos=True)),
    ]


def copying_engine(spec: dict | None, num_blocks: int = 256, **config) -> LLMEngine:
    """Each prompt's model writes its script, then `</s>`: logits one-hot at 3.0 (penalties move them)."""
    directory: Path = tiny_llama_dir()
    tokenizer = Tokenizer.from_files({name: directory / name for name in ("tokenizer.json", "tokenizer_config.json")})
    eos = tokenizer.eos_token_ids[0]
    scripts = {tuple(tokenizer.encode(prompt)): tokenizer.encode(text, add_special_tokens=False)
               for prompt, text in SCRIPTS.values()}

    def predict(context: list[int], vocab_size: int) -> int:
        prompt = next(p for p in scripts if tuple(context[:len(p)]) == p)
        written = len(context) - len(prompt)
        return scripts[prompt][written] if written < len(scripts[prompt]) else eos

    class Copier(FakeModel):
        def forward(self, *args):
            return super().forward(*args) * 3.0

    engine = engine_for_model(Copier(tokenizer.vocab_size, predict), tokenizer,
                              EngineConfig(block_size=4, speculative_config=spec, **config), max_model_len=256,
                              num_blocks=num_blocks)
    if engine.spec is not None:  # verify every draft: exactness, not the cost model's choice
        engine.spec.step_cost = None
    return engine


def run(spec: dict | None, **config) -> tuple[dict, dict, LLMEngine]:
    engine = copying_engine(spec, **config)
    samples = {}
    for rid, script, params in requests():
        engine.add_request(rid, SCRIPTS[script][0], params)
        samples[rid] = engine.requests[rid].samples
    results = run_to_completion(engine)
    assert_idle(engine)
    outputs = {rid: [(o.text, o.token_ids, o.finish_reason) for o in out.outputs] for rid, out in results.items()}
    return outputs, {rid: [(s.num_draft_tokens, s.num_accepted_tokens) for s in seqs]
                     for rid, seqs in samples.items()}, engine


@pytest.mark.parametrize("config", [dict(), dict(num_blocks=48, max_num_seqs=6)], ids=["plain", "preempting"])
def test_rule_rows_speculate_and_draw_the_same_tokens(config):
    plain, _, _ = run(None, **config)
    speculative, drafts, engine = run(NGRAM, **config)
    assert speculative == plain
    assert engine.scheduler.num_preemptions > 0 or not config
    for name, per_sample in drafts.items():  # every kind of row (both samples of n=2) verified drafts
        assert all(accepted > 0 for _, accepted in per_sample), (name, drafts)
    assert any(drafted > accepted for drafted, accepted in drafts["penalised"])
    assert not plain["penalised"][0][0].startswith(SCRIPTS["penalised"][1])  # the counts changed what it wrote
    for name in ("json", "json-cut"):  # the grammar ended the sample at its stop token both ways
        (text, _, finish), = speculative[name]
        assert finish == "stop" and json.loads(text)["path"].endswith(".py")
    assert speculative["json-cut"][0][0] == SCRIPTS["json-cut"][1]
    (text, _, finish), = speculative["choice"]
    assert finish == "stop" and re.fullmatch(CHOICE, text) and text.startswith("yes, no, yes, no, yes, no, ")
    assert engine.spec.stats.num_accepted_tokens < engine.spec.stats.num_draft_tokens


def test_a_matcher_walks_drafts_and_comes_back():
    """Each verified row's mask is the mask after the drafts before it; afterwards the matcher is where it was."""
    directory = tiny_llama_dir()
    tokenizer = Tokenizer.from_files({name: directory / name for name in ("tokenizer.json", "tokenizer_config.json")})
    compiler = GrammarCompiler(tokenizer, tokenizer.vocab_size)
    try:
        spec = StructuredOutput.from_schema(SCHEMA)
        text = tokenizer.encode('{"name": "a", "path": "b"}', add_special_tokens=False)
        eos = tokenizer.eos_token_ids[0]
        walker, reference = compiler.matcher(spec), compiler.matcher(spec)
        for token in text[:3]:
            assert walker.accept(token) and reference.accept(token)
        draft = text[3:] + [eos, text[0]]  # ends past the stop token: cut there
        assert walker.valid_prefix(draft) == len(text) - 3 + 1
        assert walker.valid_prefix([tokenizer.encode("}", add_special_tokens=False)[0]]) == 0
        draft = draft[:len(text) - 3 + 1]
        masks = unconstrained_bitmask(len(draft) + 1, tokenizer.vocab_size)
        walker.fill_bitmasks(masks, 0, draft)
        expected = unconstrained_bitmask(len(draft) + 1, tokenizer.vocab_size)
        for j, token in enumerate(draft):
            reference.fill_bitmasks(expected, j)
            assert reference.accept(token)
        assert reference.terminated and not walker.terminated  # the row after the stop token stays unconstrained
        assert torch.equal(masks, expected)
        here = unconstrained_bitmask(1, tokenizer.vocab_size)
        walker.fill_bitmasks(here, 0)
        assert torch.equal(here[0], expected[0])
    finally:
        compiler.close()
