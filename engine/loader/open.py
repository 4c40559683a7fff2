"""Format detection and the two entry points: read_model_info (metadata only) and open_model (lazy tensors)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.loader.errors import ModelLoadError
from engine.loader.gguf_config import gguf_to_hf_config
from engine.loader.gguf_header import GGUFHeader, read_gguf_header
from engine.loader.json_files import read_json_object
from engine.loader.model_info import ModelInfo, info_from_config
from engine.loader.safetensors_header import SafetensorsHeader, read_index, read_safetensors_header

if TYPE_CHECKING:  # tensors need torch; metadata (`minerva inspect`) must not import it
    from engine.loader.tensors import TensorStore

GGUF_MAGIC = b"GGUF"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "tokenizer.model",
)


@dataclass
class LoadedModel:
    """An opened model: metadata, an HF-style config dict, lazy tensors, and what the tokenizer needs."""

    info: ModelInfo
    config: dict[str, Any]
    tensors: TensorStore
    tokenizer_files: dict[str, Path]
    gguf_fields: Mapping[str, Any] | None = None  # decoded lazily: the vocabulary only when read


def detect_format(path: str | Path) -> str:
    """"gguf" for a GGUF file, "safetensors" for one .safetensors file, "hf_dir" for an HF checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(path, "directory has no config.json")
        if not ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()):
            raise ModelLoadError(path, f"directory has neither {SINGLE_FILE} nor {INDEX_FILE}")
        return "hf_dir"
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    if not path.is_file():
        raise ModelLoadError(path, "not a regular file or directory")  # a FIFO would block the open below
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read: {exc.strerror or exc}") from exc
    if path.suffix == ".gguf" or magic == GGUF_MAGIC:
        return "gguf"
    if path.suffix == ".safetensors":
        return "safetensors"
    raise ModelLoadError(path, "not a model: expected a .gguf file, a .safetensors file or an HF checkpoint directory")


def default_model_id(path: str | Path) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def read_model_info(path: str | Path, model_id: str | None = None) -> ModelInfo:
    """Metadata only: headers and JSON, never tensor bytes."""
    return _Source.open(Path(path)).info(model_id or default_model_id(path))


def open_model(path: str | Path, model_id: str | None = None) -> LoadedModel:
    """Metadata plus lazy handles for every tensor; nothing is read until a tensor is loaded."""
    source = _Source.open(Path(path))
    return LoadedModel(
        info=source.info(model_id or default_model_id(path)),
        config=source.config,
        tensors=source.tensor_store(),
        tokenizer_files=source.tokenizer_files,
        gguf_fields=source.gguf.decoded_fields() if source.gguf else None,
    )


class _Source:
    """The parsed headers of one model path, whatever its format: a GGUF header or safetensors shards."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        config: dict[str, Any],
        gguf: GGUFHeader | None = None,
        shards: list[SafetensorsHeader] | None = None,
    ) -> None:
        self.path, self.format, self.config, self.gguf, self.shards = path, fmt, config, gguf, shards or []
        folder = path if path.is_dir() else path.parent
        present = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
        self.tokenizer_files = {} if gguf else present  # a GGUF carries its tokenizer in its key-values

    @classmethod
    def open(cls, path: Path) -> "_Source":
        fmt = detect_format(path)
        if fmt == "gguf":
            header = read_gguf_header(path)
            return cls(path, fmt, gguf_to_hf_config(header), gguf=header)
        folder = path if fmt == "hf_dir" else path.parent
        config = _read_config(folder / "config.json", path)
        if fmt == "safetensors":
            shards = [read_safetensors_header(path)]
        elif (folder / SINGLE_FILE).is_file():
            shards = [read_safetensors_header(folder / SINGLE_FILE)]
        else:
            shards = _read_sharded(folder / INDEX_FILE)
        return cls(path, fmt, config, shards=shards)

    @property
    def file_size(self) -> int:
        return self.gguf.file_size if self.gguf else sum(shard.file_size for shard in self.shards)

    def tensor_types(self) -> list[tuple[str, int, int]]:
        """(type, logical ndim, logical parameters) per logical tensor; an MXFP4 blocks/scales pair counts once."""
        if self.gguf:
            return [(t.type_name, len(t.shape), t.numel) for t in self.gguf.tensors]
        names = {name for shard in self.shards for name in shard.tensors}
        kinds = []
        for shard in self.shards:
            for name, t in shard.tensors.items():
                if _is_mxfp4_pair(name, t.dtype, names, "_blocks"):
                    kinds.append(("MXFP4", len(t.shape) - 1, t.numel * 2))
                elif not _is_mxfp4_pair(name, t.dtype, names, "_scales"):
                    kinds.append((t.dtype, len(t.shape), t.numel))
        return kinds

    def info(self, model_id: str) -> ModelInfo:
        name = self.gguf.fields.get("general.name") if self.gguf else None
        return info_from_config(
            self.config,
            model_id=model_id,
            path=self.path,
            format=self.format,
            tensor_types=self.tensor_types(),
            file_size=self.file_size,
            tensor_count=len(self.gguf.tensors) if self.gguf else sum(len(s.tensors) for s in self.shards),
            chat_template=self._has_chat_template(),
            name=name if isinstance(name, str) else None,
        )

    def _has_chat_template(self) -> bool:
        if self.gguf:
            return isinstance(self.gguf.fields.get("tokenizer.chat_template"), str)
        if "chat_template.jinja" in self.tokenizer_files:
            return True
        tokenizer_config = self.tokenizer_files.get("tokenizer_config.json")
        if tokenizer_config is None:
            return False
        return bool(read_json_object(tokenizer_config, "tokenizer config").get("chat_template"))

    def tensor_store(self) -> TensorStore:
        from engine.loader.tensors import LazyTensor, MappedFile, TensorStore

        if self.gguf:
            mapped = MappedFile(self.path)
            handles = {
                t.name: LazyTensor(t.name, t.shape, t.type_name, t.nbytes, t.offset, mapped) for t in self.gguf.tensors
            }
            return TensorStore(handles, self.path)
        handles = {}
        for shard in self.shards:
            mapped = MappedFile(shard.path)
            for name, t in shard.tensors.items():
                handles[name] = LazyTensor(name, t.shape, t.dtype, t.nbytes, t.offset, mapped)
        return TensorStore(handles, self.path)


def _is_mxfp4_pair(name: str, dtype: str, names: set[str], suffix: str) -> bool:
    """gpt-oss stores MXFP4 weights as uint8 `{prefix}_blocks` + `{prefix}_scales`."""
    if dtype != "U8" or not name.endswith(suffix):
        return False
    prefix = name[: -len(suffix)]
    return f"{prefix}_blocks" in names and f"{prefix}_scales" in names


def _read_config(config_path: Path, model_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise ModelLoadError(model_path, f"no config.json beside the weights (looked for {config_path})")
    config = read_json_object(config_path, "config")
    if not isinstance(config.get("model_type"), str):
        raise ModelLoadError(config_path, "config has no model_type")
    return config


def _read_sharded(index_path: Path) -> list[SafetensorsHeader]:
    """Read every shard's header and check the index's tensor names against what the shards hold."""
    weight_map = read_index(index_path)
    shards = {path: read_safetensors_header(path) for path in sorted(set(weight_map.values()))}
    for name, path in weight_map.items():
        if name not in shards[path].tensors:
            raise ModelLoadError(path, f"tensor {name!r} listed in {index_path.name} is not in this shard")
    seen: dict[str, Path] = {}
    for path, shard in shards.items():
        for name in shard.tensors:
            if name in seen:
                raise ModelLoadError(path, f"tensor {name!r} is also in {seen[name].name}")
            seen[name] = path
    return list(shards.values())
