"""The `minerva` command line: one subcommand per job (`inspect` here, `serve` in server/launch.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from engine.loader import ModelInfo, ModelLoadError, read_model_info
from engine.loader import format_size
from server.launch import add_serve_parser

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minerva", description="Minerva: an OpenAI-compatible LLM inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print model metadata without reading tensor data")
    inspect.add_argument("paths", nargs="+", metavar="PATH", help=".gguf file, .safetensors file or HF checkpoint dir")
    inspect.add_argument("--json", action="store_true", help="one JSON object per model (ModelInfo field names)")
    inspect.set_defaults(handler=inspect_command)
    add_serve_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
