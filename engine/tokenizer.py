"""Tokenizers: HF tokenizer.json or a GGUF vocabulary, plus chat templates in a jinja2 sandbox."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers
from tokenizers.decoders import DecodeStream

from engine.errors import MinervaError
from engine.loader.open import LoadedModel
from engine.token_bytes import TokenBytes


class TokenizerError(MinervaError, ValueError):
    """The model's tokenizer files or GGUF vocabulary cannot be used; the message says which and why."""


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode plus chat templates; built `from_files` (HF) or `from_gguf` (GGUF key-values)."""

    def __init__(self, backend: HFTokenizer, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, eos_token_ids: list[int] | None = None,
                 add_bos_token: bool = False) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        ids = list(eos_token_ids or [])
        eos_id = backend.token_to_id(eos_token) if eos_token is not None else None
        if eos_id is not None:
            ids.append(eos_id)
        self.eos_token_ids = sorted(set(ids))
        self.add_bos_token = add_bos_token
        self._bos_id = backend.token_to_id(bos_token) if bos_token else None
        self._template = None
        if chat_template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = _strftime_now
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(chat_template)
            except TemplateError as exc:
                raise TokenizerError(f"the chat template cannot be parsed: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and self._bos_id is not None and ids[:1] != [self._bos_id]:
            ids = [self._bos_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def text_stream(self, context_ids: list[int], skip_special_tokens: bool = True) -> "TextStream":
        return TextStream(self.backend, context_ids, skip_special_tokens)

    @functools.cached_property
    def token_bytes(self) -> TokenBytes:
        """token id -> its real bytes (logprobs' `bytes`; a token may hold part of a character)."""
        return TokenBytes(self.backend)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if self._template is None:
            raise TokenizerError("this model has no chat template")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)

    @classmethod
    def from_files(cls, files: Mapping[str, Path]) -> "Tokenizer":
        """From an HF checkpoint's tokenizer.json (+ tokenizer_config.json, chat_template.jinja)."""
        if "tokenizer.json" not in files:
            raise TokenizerError("no tokenizer.json beside the model (only HF fast tokenizers are supported)")
        try:
            backend = HFTokenizer.from_file(str(files["tokenizer.json"]))
        except Exception as exc:  # the tokenizers library raises a bare Exception for a malformed file
            raise TokenizerError(f"tokenizer.json: cannot read the tokenizer: {exc}") from exc
        config = _json_object(files, "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if "chat_template.jinja" in files:
            template = Path(files["chat_template.jinja"]).read_text()
        eos_ids: list[int] = []
        if "generation_config.json" in files:
            eos = _json_object(files, "generation_config.json").get("eos_token_id")
            eos_ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        # encode() adds BOS only when the post-processor has not already put it first
        return cls(backend, template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   eos_ids, add_bos_token=bool(config.get("add_bos_token")))

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        """From `tokenizer.ggml.*` keys: gpt2-style byte-level BPE or llama SentencePiece-style."""
        kind = fields.get("tokenizer.ggml.model")
        tokens = list(fields.get("tokenizer.ggml.tokens") or [])
        if not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges") or []]
            backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=False))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            backend.decoder = decoders.ByteLevel()
        elif kind == "llama":
            scores = list(fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
            unk = fields.get("tokenizer.ggml.unknown_token_id", 0)
            backend = HFTokenizer(models.Unigram(list(zip(tokens, map(float, scores))), unk_id=int(unk),
                                                 byte_fallback=True))
            backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                      normalizers.Replace(" ", "\u2581")])
            backend.pre_tokenizer = None
            backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                                 decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (gpt2 and llama are supported)")
        special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)]
        backend.add_special_tokens(special)

        def token(key: str) -> str | None:
            index = fields.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

        eos_ids = [int(fields[f"tokenizer.ggml.{key}_token_id"]) for key in ("eos", "eot", "eom")
                   if f"tokenizer.ggml.{key}_token_id" in fields]
        eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4) and t in END_OF_GENERATION]
        ending = {tokens[i]: i for i in eos_ids if 0 <= i < len(tokens)}
        if {"<|return|>", "<|call|>"} <= ending.keys():  # harmony (gpt-oss): <|end|> closes a message, not the turn
            eos_ids = [i for i in eos_ids if i != ending.get("<|end|>")]
        add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(backend, fields.get("tokenizer.chat_template"), token("bos"), token("eos"), eos_ids,
                   add_bos_token=add_bos)


# Special tokens that end a generation whatever the GGUF's eos/eot ids say, as llama.cpp's
# vocabulary treats them (a GGUF export rarely carries the HF generation_config's eos list).
# As in llama.cpp, a vocabulary with both <|return|> and <|call|> (gpt-oss's harmony format)
# does not end on <|end|>, which there only closes one message (e.g. the analysis channel).
END_OF_GENERATION = frozenset({
    "<|endoftext|>", "<|end|>", "<|return|>", "<|call|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>",
    "<end_of_turn>", "<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>",
})


def _json_object(files: Mapping[str, Path], name: str) -> dict[str, Any]:
    """One of the tokenizer's JSON side files as a dict ({} when absent); malformed is a TokenizerError."""
    if name not in files:
        return {}
    try:
        data = json.loads(Path(files[name]).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{name}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{name}: expected a JSON object")
    return data


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    """transformers' `tojson`: plain JSON (jinja's own escapes <, > and & for HTML, which tool schemas must not get)."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _strftime_now(format: str) -> str:
    """transformers' template global (Llama 3.x templates date their system prompt with it)."""
    return datetime.now().strftime(format)


class TextStream:
    """The text of token ids fed one at a time, by tokenizers' DecodeStream (one Rust call per token,
    ~9x cheaper than decoding two windows in Python per token); a piece comes out only once it is whole
    UTF-8. `context_ids` (a prompt's tail) are fed first and their text dropped, so the first new
    token keeps the leading space a decoder would strip at the start of a text."""

    def __init__(self, backend: HFTokenizer, context_ids: list[int], skip_special_tokens: bool) -> None:
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        if context_ids:
            self._stream.step(backend, list(context_ids))

    def step(self, token_id: int) -> str:
        """The text `token_id` completes ("" while a character is still partial or the id has no text)."""
        return self._stream.step(self._backend, token_id) or ""


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"chat template error: {message}")


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer of an `engine.loader.LoadedModel`."""
    if loaded.gguf_fields is not None:
        return Tokenizer.from_gguf(loaded.gguf_fields)
    return Tokenizer.from_files(loaded.tokenizer_files)
