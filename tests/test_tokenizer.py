"""Tokenizer: HF files, GGUF vocabularies, sandboxed chat templates, incremental detokenization with stops."""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer, TokenizerError
from tests.server_fixtures import CHAT_TEMPLATE, save_tokenizer

TEXT = "Hello world! The quick brown fox."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(directory)
    return directory


def _files(directory):
    return {p.name: p for p in directory.iterdir()}


def test_hf_files_encode_decode_and_template(hf_dir):
    tok = Tokenizer.from_files(_files(hf_dir))
    reference = HFTokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert tok.encode(TEXT) == reference.encode(TEXT).ids
    assert tok.encode(TEXT)[0] == reference.token_to_id("<s>")  # once, from the post-processor
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_token_ids == [reference.token_to_id("</s>")]
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<s><|user|>hi</s><|assistant|>"
    from jinja2 import Template
    assert tok.apply_chat_template(messages) == Template(CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>")


def test_template_sandbox_blocks_attribute_escape(hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__ }}"
    (hf_dir / "evil.json").write_text(json.dumps(config))
    files = {**_files(hf_dir), "tokenizer_config.json": hf_dir / "evil.json"}
    tok = Tokenizer.from_files(files)
    from jinja2.exceptions import SecurityError
    try:
        out = tok.apply_chat_template([{"role": "user", "content": "x"}])
    except SecurityError:
        return
    assert "object" not in out


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_files({})


def _gguf_fields(tmp_path, kind, tokens, **extra):
    path = tmp_path / f"{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and t.endswith(">") and len(t) > 2 else 1 for t in tokens])
    if "merges" in extra:
        writer.add_token_merges(extra["merges"])
    if "scores" in extra:
        writer.add_token_scores(extra["scores"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    if "eot" in extra:
        writer.add_eot_token_id(extra["eot"])
    writer.add_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def test_gguf_gpt2_bpe(tmp_path):
    tokens = ["<s>", "</s>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello", "Ġw", "Ġwo"]
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
    tok = Tokenizer.from_gguf(_gguf_fields(tmp_path, "gpt2", tokens, merges=merges))
    ids = tok.encode("hello world", add_special_tokens=False)
    assert [tokens[i] for i in ids] == ["hello", "Ġwo", "r", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert tok.eos_token_ids == [1] and tok.has_chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "[a]"


def test_gguf_llama_sentencepiece(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "\u2581hello", "\u2581world", "\u2581", "h", "e", "l", "o", "w", "r", "d"]
    tokens[0], tokens[1] = "<s>", "</s>"
    scores = [0.0, 0.0, -1.0, -2.0, -2.0, -5.0] + [-10.0] * 7
    tok = Tokenizer.from_gguf(_gguf_fields(tmp_path, "llama", tokens, scores=scores))
    ids = tok.encode("hello world")
    assert ids[0] == 0 and [tokens[i] for i in ids[1:]] == ["\u2581hello", "\u2581world"]
    assert tok.decode(ids) == "hello world"


@pytest.mark.parametrize("specials,eot,ends", [
    (["<|endoftext|>", "<|end|>"], None, ["</s>", "<|endoftext|>", "<|end|>"]),  # llama.cpp's end-of-generation set
    (["<|end|>", "<|return|>", "<|call|>"], 5, ["</s>", "<|return|>", "<|call|>"]),  # harmony: <|end|> only ends a message
    (["<|end|>", "<|return|>"], 5, ["</s>", "<|end|>", "<|return|>"]),
])
def test_gguf_end_of_generation_tokens_follow_llama_cpp(tmp_path, specials, eot, ends):
    tokens = ["<s>", "</s>", "h", "i", "hi", *specials]
    extra = {"merges": ["h i"]} | ({"eot": eot} if eot is not None else {})
    tok = Tokenizer.from_gguf(_gguf_fields(tmp_path, "gpt2", tokens, **extra))
    assert sorted(tokens[i] for i in tok.eos_token_ids) == sorted(ends)


def test_gguf_unknown_model_rejected(tmp_path):
    with pytest.raises(TokenizerError, match="unsupported"):
        Tokenizer.from_gguf(_gguf_fields(tmp_path, "bert", ["a", "b"]))


def test_detokenizer_never_emits_broken_utf8_and_holds_stops(hf_dir):
    from tokenizers import Tokenizer as Raw, decoders, models, pre_tokenizers
    # byte-level vocabulary: every byte its own token, so "é" takes two tokens
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    raw = Raw(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = Tokenizer(raw)
    text = "café STOP ok"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [], ["STOP"])
    shown = []
    for token in ids:
        detok.add(token, len(shown) + 1)
        shown.append(detok.take_delta(finished=detok.stopped_by is not None))
        assert "\ufffd" not in shown[-1]
        if detok.stopped_by:
            break
    assert "".join(shown) == "café " and detok.stopped_by == "STOP"
    assert any(s == "" for s in shown)  # the half character and the partial stop were held back
