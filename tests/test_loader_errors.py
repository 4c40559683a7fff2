"""Bad input: every corrupt header, file or JSON raises ModelLoadError naming the file and the problem,
quickly and without allocating in proportion to a number read from the file."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from engine.loader import ModelLoadError, detect_format, open_model, read_model_info

pytestmark = pytest.mark.timeout(60)
TENSOR = "blk.0.attn_q.weight"
MEMORY_CAP = 16 * 1024 * 1024  # far above what parsing a few-KB header needs, far below a trusted bogus count


def gguf_bytes(tmp: Path) -> bytes:
    """A real little GGUF (written by gguf.GGUFWriter) whose bytes the tests then corrupt."""
    path = tmp / "source.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_token_list([f"tok{i}" for i in range(100)])
    writer.add_token_scores([0.5] * 100)
    writer.add_tensor("token_embd.weight", np.ones((100, 32), dtype=np.float16))
    quantized = gguf.quants.quantize(np.ones((32, 32), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor(TENSOR, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> bytes:
    return gguf_bytes(tmp_path_factory.mktemp("gguf"))


def tensor_info_at(data: bytes) -> int:
    """Offset of the n_dims field that follows TENSOR's name in the tensor-info table."""
    return data.index(TENSOR.encode()) + len(TENSOR)


def expect_error(path: Path, match: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as caught:
        read_model_info(path)
    assert str(path) in str(caught.value)
    return caught.value


def write(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_good_gguf_reads(tmp_path, good_gguf):
    info = read_model_info(write(tmp_path, good_gguf, "good.gguf"))
    assert info.tensor_count == 2 and info.vocab_size == 100


def test_every_truncation_is_an_error(tmp_path, good_gguf):
    for length in sorted({*range(0, 64), *range(64, len(good_gguf), 37), len(good_gguf) - 1}):
        path = write(tmp_path, good_gguf[:length])
        with pytest.raises(ModelLoadError, match="truncated|outside|not a GGUF|cannot fit"):
            read_model_info(path)


def test_wrong_magic_and_version(tmp_path, good_gguf):
    expect_error(write(tmp_path, b"GGML" + good_gguf[4:]), "not a GGUF file")
    expect_error(write(tmp_path, patched(good_gguf, 4, "<I", 99)), "version 99")


@pytest.mark.parametrize("offset, what", [(8, "tensor count"), (16, "key-value count")])
def test_absurd_counts(tmp_path, good_gguf, offset, what):
    for count in (10**6, 2**40, 2**64 - 1):
        expect_error(write(tmp_path, patched(good_gguf, offset, "<Q", count)), f"{what} {count} cannot fit")


def test_absurd_dims_and_dim_counts(tmp_path, good_gguf):
    at = tensor_info_at(good_gguf)
    expect_error(write(tmp_path, patched(good_gguf, at, "<I", 7)), "7 dims")
    expect_error(write(tmp_path, patched(good_gguf, at, "<I", 0)), "0 dims")
    expect_error(write(tmp_path, patched(good_gguf, at + 4 + 8, "<Q", 2**50)), "outside")
    expect_error(write(tmp_path, patched(good_gguf, at + 4, "<Q", 2**63 + 32)), "outside")
    expect_error(write(tmp_path, patched(good_gguf, at + 4, "<Q", 33)), "not a multiple")


def test_unknown_quant_type_and_bad_offsets(tmp_path, good_gguf):
    at = tensor_info_at(good_gguf) + 4 + 16
    expect_error(write(tmp_path, patched(good_gguf, at, "<I", 99)), "unknown quant type 99")
    expect_error(write(tmp_path, patched(good_gguf, at + 4, "<Q", 2**40)), "outside")
    expect_error(write(tmp_path, patched(good_gguf, at + 4, "<Q", 2**64 - 32)), "outside")
    expect_error(write(tmp_path, patched(good_gguf, at + 4, "<Q", 3)), "not aligned")


def test_huge_string_and_array_lengths(tmp_path, good_gguf):
    first_key_length = 24
    expect_error(write(tmp_path, patched(good_gguf, first_key_length, "<Q", 2**62)), "key length")
    tokens = good_gguf.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    expect_error(write(tmp_path, patched(good_gguf, tokens, "<Q", 2**61)), "array of 2305843009213693952 strings")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_headers_fail_cleanly(tmp_path, good_gguf, data):
    """Random byte patches and huge integers over the header: either a valid model or ModelLoadError."""
    header_end = tensor_info_at(good_gguf) + 4 + 16 + 4 + 8
    out = bytearray(good_gguf)
    for _ in range(data.draw(st.integers(1, 4))):
        if data.draw(st.booleans()):
            at = data.draw(st.integers(0, header_end - 1))
            out[at] = data.draw(st.integers(0, 255))
        else:
            at = data.draw(st.integers(0, header_end - 8))
            struct.pack_into("<Q", out, at, data.draw(st.sampled_from([2**31, 2**32 + 1, 2**48, 2**63, 2**64 - 1])))
    path = write(tmp_path, bytes(out), "mutant.gguf")
    tracemalloc.start()
    try:
        model = open_model(path)
        for tensor in model.tensors.values():
            assert tensor.load(torch.float32).shape == tensor.shape
    except ModelLoadError as exc:
        assert str(path) in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_CAP


@pytest.fixture(scope="module")
def good_safetensors(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("st") / "model"
    folder.mkdir()
    save_file({"a": torch.ones(4, 8), "b": torch.zeros(3, dtype=torch.bfloat16)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    return folder


def clone(source: Path, tmp_path: Path, weights: bytes | None = None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text((source / "config.json").read_text())
    (folder / "model.safetensors").write_bytes(weights if weights is not None else (source / "model.safetensors").read_bytes())
    return folder


def with_header(header: dict, data: bytes = b"\0" * 64) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_safetensors_header_problems(tmp_path, good_safetensors):
    good = (good_safetensors / "model.safetensors").read_bytes()
    weights = lambda folder: folder / "model.safetensors"  # noqa: E731
    cases = [
        (good[:5], "no header length"),
        (struct.pack("<Q", 2**40) + good[8:], "runs past the end"),
        (struct.pack("<Q", 4) + b"{oops" + good[13:], "not valid JSON"),
        (with_header([1, 2]), "not a JSON object"),
        (with_header({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}), "unknown dtype"),
        (with_header({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), "shape"),
        (with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 9]}}), "needs 8"),
        (with_header({"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}), "outside"),
        (with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}), "data_offsets"),
        (good[:-4], "outside"),
    ]
    for data, match in cases:
        folder = clone(good_safetensors, tmp_path, data)
        with pytest.raises(ModelLoadError, match=match) as caught:
            read_model_info(folder)
        assert str(weights(folder)) in str(caught.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_safetensors_fail_cleanly(tmp_path, good_safetensors, patches):
    out = bytearray((good_safetensors / "model.safetensors").read_bytes())
    for at, value in patches:
        out[min(at, len(out) - 1)] = value
    folder = clone(good_safetensors, tmp_path, bytes(out))
    tracemalloc.start()
    try:
        for tensor in open_model(folder).tensors.values():
            assert tensor.load().numel() == int(np.prod(tensor.shape))
    except ModelLoadError as exc:
        assert "model.safetensors" in str(exc)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_CAP


@pytest.mark.parametrize(
    "config, match",
    [("{not json", "not valid JSON"), ("[1]", "not a JSON object"), ('{"hidden_size": 4}', "no model_type")],
)
def test_malformed_config(tmp_path, good_safetensors, config, match):
    folder = clone(good_safetensors, tmp_path)
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=match) as caught:
        read_model_info(folder)
    assert str(folder / "config.json") in str(caught.value)


def test_missing_paths_and_unknown_files(tmp_path, good_safetensors):
    with pytest.raises(ModelLoadError, match="no such file"):
        read_model_info(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="no config.json"):
        detect_format(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model"):
        detect_format(tmp_path / "notes.txt")
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "x.safetensors").write_bytes((good_safetensors / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="no config.json beside"):
        read_model_info(lone / "x.safetensors")


def sharded(tmp_path: Path, index: object) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"a": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


def test_index_problems(tmp_path):
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert read_model_info(sharded(tmp_path, {"weight_map": {"a": shard1, "b": shard2}})).tensor_count == 2
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    for index, match, where in [
        ("{broken", "not valid JSON", index_path),
        ({"metadata": {}}, "no weight_map", index_path),
        ({"weight_map": {"a": shard1, "b": "model-00003.safetensors"}}, "missing", "model-00003.safetensors"),
        ({"weight_map": {"a": shard1, "c": shard2}}, "'c' listed", shard2),
        ({"weight_map": {"a": "../x.safetensors"}}, "not a plain file name", index_path),
    ]:
        with pytest.raises(ModelLoadError, match=match) as caught:
            read_model_info(sharded(tmp_path, index))
        assert str(where) in str(caught.value)


def test_file_shrunk_after_open(tmp_path, good_gguf):
    path = write(tmp_path, good_gguf, "shrinks.gguf")
    model = open_model(path)
    path.write_bytes(good_gguf[:200])  # replaced by a truncated copy before any tensor was read
    with pytest.raises(ModelLoadError, match="no longer in the file"):
        model.tensors[TENSOR].load()
    with pytest.raises(ModelLoadError, match="truncated"):
        model.gguf_fields["tokenizer.ggml.tokens"]


def test_special_files_and_oversized_json(tmp_path, good_safetensors, monkeypatch):
    import os

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelLoadError, match="not a regular file"):
        read_model_info(fifo)  # must not block waiting for a writer
    folder = clone(good_safetensors, tmp_path)
    monkeypatch.setattr("engine.loader.json_files.MAX_JSON_BYTES", 10)
    with pytest.raises(ModelLoadError, match="more than the 10-byte limit") as caught:
        read_model_info(folder)
    assert str(folder / "config.json") in str(caught.value)
