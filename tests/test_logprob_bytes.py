"""Logprobs of text whose characters span tokens, through a live server and the openai client.

A scripted model writes a fixed multi-byte text with a byte-level tokenizer whose tokens split
characters; the reference is the text itself: the chat `bytes` rebuild the content, and every
completions `text_offset` points into the returned text at the character its token belongs to.
"""

from __future__ import annotations

from types import SimpleNamespace

import openai
import pytest

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.builder import engine_for_model
from engine.token_bytes import token_text
from engine.tokenizer import Tokenizer
from fake_model import FakeModel
from server.app import create_app
from server_fixtures import LiveServer
from test_token_bytes import byte_level_tokenizer

pytestmark = pytest.mark.timeout(120)
SCRIPT = "naïve 🦊 costs 3€ — 東京 😀!"  # 😀 is not in the tokenizer's training text: one token per byte
GO = "<|go|>"


@pytest.fixture(scope="module")
def client():
    """A model that writes SCRIPT after the last <|go|> token, then </s>."""
    trained = byte_level_tokenizer()
    trained.backend.add_special_tokens([GO])
    tokenizer = Tokenizer(trained.backend, "{% for m in messages %}{{ m['content'] }}{% endfor %}" + GO,
                          eos_token="</s>")
    script = tokenizer.encode(SCRIPT, add_special_tokens=False)
    go, eos = tokenizer.backend.token_to_id(GO), tokenizer.backend.token_to_id("</s>")
    assert any(token_text(tokenizer.token_bytes(t)).startswith("\\x") for t in script)  # some token splits a character

    def predict(context: list[int], vocab_size: int) -> int:
        written = len(context) - 1 - max(i for i, t in enumerate(context) if t == go)
        return script[written] if written < len(script) else eos

    info = SimpleNamespace(architecture="llama", path="scripted", vocab_size=tokenizer.vocab_size, to_dict=lambda: {})
    llm = engine_for_model(FakeModel(tokenizer.vocab_size, predict), tokenizer, EngineConfig(block_size=16),
                    max_model_len=512, model_info=info, num_blocks=64)
    server = LiveServer(create_app({"scripted": AsyncEngine(llm)}))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprob_bytes_rebuild_the_content(client, stream):
    kwargs = dict(model="scripted", messages=[{"role": "user", "content": "go"}], logprobs=True, top_logprobs=2, temperature=0,
                  max_tokens=60)
    if stream:
        chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        content, entries = choice.message.content, choice.logprobs.content
    assert content == SCRIPT
    assert bytes(b for e in entries[:-1] for b in e.bytes) == SCRIPT.encode()  # the last entry is </s>
    partial = [e for e in entries if e.token.startswith("\\x")]
    assert partial and all("\ufffd" not in e.token for e in entries)
    for e in entries:
        assert e.token == bytes(e.bytes).decode("utf-8", "backslashreplace")
        for alternative in e.top_logprobs:
            assert alternative.token == bytes(alternative.bytes).decode("utf-8", "backslashreplace")


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_offsets_count_characters_of_the_text(client, stream):
    prompt = "go é" + GO
    kwargs = dict(model="scripted", prompt=prompt, logprobs=1, max_tokens=60, temperature=0)
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    else:
        choice = client.completions.create(**kwargs).choices[0]
        text, tokens, offsets = choice.text, choice.logprobs.tokens, choice.logprobs.text_offset
    assert text == SCRIPT
    assert offsets == sorted(offsets) and offsets[0] == 0 and all(o <= len(text) for o in offsets)
    for token, offset, following in zip(tokens, offsets, offsets[1:] + [len(text)]):
        if not token.startswith("\\x") and following > offset:  # whole characters: the text there is the token
            assert text[offset:following] == token
    grin = text.index("😀")
    split = [o for o in offsets if o == grin]
    assert len(split) >= 2  # the tokens holding the rest of its bytes all begin where it does
