"""The `minerva` command line: one subcommand per job (`inspect` and `models` here, `serve` in
server/launch.py, `chat` and `generate` in server/chat_cli.py).

Tool commands (`inspect`, `models`, `--version`) import neither torch nor FastAPI: each
subcommand imports its heavy modules inside its handler. Any MinervaError (a bad file,
setting or flag value) ends the command with `error: <message>` and exit status 2.
"""

from __future__ import annotations

import os

# Before anything imports torch: OpenMP reads this once. Idle workers sleep instead of spinning on
# cores that other processes (or this server's other threads) need (engine/cpu_threads.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from engine.assets import builtin_models
from engine.errors import MinervaError
from engine.loader import ModelInfo, ModelLoadError, read_model_info
from engine.loader import format_size
from server.chat_cli import add_chat_parsers
from server.launch import add_serve_parser
from server.version import minerva_version

INSPECT_COLUMNS: tuple[tuple[str, Callable[[ModelInfo], object]], ...] = (
    ("id", lambda i: i.id),
    ("format", lambda i: i.format),
    ("arch", lambda i: i.architecture),
    ("quant", lambda i: i.quantization),
    ("params", lambda i: format_count(i.parameters)),
    ("size", lambda i: format_size(i.file_size)),
    ("tensors", lambda i: i.tensor_count),
    ("layers", lambda i: i.layers),
    ("hidden", lambda i: i.hidden_size),
    ("heads", lambda i: f"{i.attention_heads}/{i.kv_heads}x{i.head_dim}"),
    ("vocab", lambda i: i.vocab_size),
    ("context", lambda i: i.context_length),
    ("experts", lambda i: f"{i.active_experts}/{i.experts}" if i.experts else "-"),
    ("rope", lambda i: _rope(i)),
    ("chat", lambda i: "yes" if i.chat_template else "no"),
)


def format_count(count: int) -> str:
    for unit, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _rope(info: ModelInfo) -> str:
    theta = f"{info.rope_theta:g}" if info.rope_theta is not None else "-"
    if info.rope_scaling:
        kind = info.rope_scaling.get("rope_type") or info.rope_scaling.get("type")
        factor = info.rope_scaling.get("factor")
        return f"{theta} {kind} x{factor:g}" if isinstance(factor, (int, float)) else f"{theta} {kind}"
    return theta


def render_table(infos: Sequence[ModelInfo]) -> str:
    rows = [[name for name, _ in INSPECT_COLUMNS]]
    rows += [[str(get(info)) for _, get in INSPECT_COLUMNS] for info in infos]
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def inspect_command(args: argparse.Namespace) -> int:
    """Print each model's metadata; a path that fails is reported on stderr and makes the exit status 1."""
    infos, failed = [], False
    for path in args.paths:
        try:
            infos.append(read_model_info(path))
        except ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        for info in infos:
            print(json.dumps(info.to_dict()))
    elif infos:
        print(render_table(infos))
    return 1 if failed else 0


def models_command(args: argparse.Namespace) -> int:
    """The built-in model names `serve`, `chat` and `generate` accept, and where each one's files are."""
    rows = [("name", "where", "what")]
    for model in builtin_models():
        rows.append((model.name, str(model.path) if model.path else f"not installed: {model.missing_hint}",
                     model.description))
    widths = [max(len(row[col]) for row in rows) for col in range(2)]
    for name, where, what in rows:
        print(f"{name.ljust(widths[0])}  {where.ljust(widths[1])}  {what}".rstrip())
    return 0


class VersionAction(argparse.Action):
    """`--version`: the installed version, looked up only when asked (package metadata costs ~40 ms)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print Minerva's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"minerva {minerva_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minerva", description="Minerva: an OpenAI-compatible LLM inference server")
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", help="list the built-in models and where their files are")
    models.set_defaults(handler=models_command)
    inspect = commands.add_parser("inspect", help="print model metadata without reading tensor data")
    inspect.add_argument("paths", nargs="+", metavar="PATH", help=".gguf file, .safetensors file or HF checkpoint dir")
    inspect.add_argument("--json", action="store_true", help="one JSON object per model (ModelInfo field names)")
    inspect.set_defaults(handler=inspect_command)
    add_serve_parser(commands)
    add_chat_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)  # each subcommand's handler returns its exit status
        return code
    except MinervaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
