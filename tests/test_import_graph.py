"""The packages' import graph: data flows server -> engine -> kernels, and no module cycle hides
behind a function-level import. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "engine", "kernels")
LAYER = {"server": 0, "engine": 1, "kernels": 2}  # a package may import only from its own layer or below


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function bodies included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A module cycle (package __init__ re-exports of their own submodules excepted), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if child.startswith(node + "."):
                continue  # a package importing its own submodule
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_import_only_downwards(package: str) -> None:
    upward = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                    if module.split(".")[0] == package
                    for target in targets if LAYER[target.split(".")[0]] < LAYER[package])
    assert not upward, "\n".join(upward)


# What the server may import of the engine: the client contract and its public types (messages, config,
# errors, metadata). Never its machinery (LLMEngine, scheduler, runner, the clients' implementations).
SERVER_MAY_IMPORT = {
    "engine.client",  # EngineClient, start_engine
    "engine.reports",  # EngineStats, EngineDescription
    "engine.errors",
    "engine.config",
    "engine.outputs",  # RequestOutput and its accumulator
    "engine.sampling_params",
    "engine.structured.spec",  # StructuredOutput
    "engine.tokenizer",  # the Tokenizer the client hands out, TokenizerError
    "engine.models.errors",  # ModelConfigError
    "engine.loader",  # ModelInfo and the metadata readers (`minerva inspect`, model checks)
    "engine.assets",  # the built-in model names
    "engine.prompt_rules",  # the context rules the routes apply before reserving rate-limit tokens
    "engine.token_bytes",  # a token's bytes for logprobs
}


def test_server_imports_only_the_engines_public_surface() -> None:
    reached = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                     if module.split(".")[0] == "server"
                     for target in targets if target.split(".")[0] == "engine"
                     and target not in SERVER_MAY_IMPORT and not target.startswith("engine.loader."))
    assert not reached, "\n".join(reached)


def test_cycle_finder_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a.x"}, "a.x": {"b"}, "b": set()}) is None
