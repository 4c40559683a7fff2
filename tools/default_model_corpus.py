"""English corpus for the default model: prose from Python docstrings and the language reference.

Sources (all read as text with `ast`; nothing is imported, so no module side effects):
- the running interpreter's standard library docstrings and `pydoc_data/topics.py` (the
  language reference as shipped with CPython), PSF License 2.0;
- docstrings of a few installed, permissively licensed packages (`PACKAGES`).
Code samples, doctests, tables and reST markup are dropped so the model learns English
sentences, not syntax. Docstrings of named modules, classes and functions also become
question/answer pairs that teach the chat format.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# package directory -> (distribution name, licence as declared by the distribution)
PACKAGES = {
    "numpy": ("numpy", "BSD-3-Clause"),
    "transformers": ("transformers", "Apache-2.0"),
    "networkx": ("networkx", "BSD-3-Clause"),
    "pydantic": ("pydantic", "MIT"),
    "pip": ("pip", "MIT"),
    "setuptools": ("setuptools", "MIT"),
    "huggingface_hub": ("huggingface_hub", "Apache-2.0"),
}
SKIPPED_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "site-packages", "__pycache__", "turtledemo"}
WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
PROSE_LINE = re.compile(r"^[A-Za-z0-9\"'(][^{}<>|\\=#$@\[\]]*$")
REST_ROLE = re.compile(r":[a-z:]+:`~?!?([^`<]+?)(?:\s*<[^>]*>)?`")
QUESTIONS = {
    "module": ("What is the {name} module for?", "Tell me about the {name} module."),
    "class": ("What is {name}?", "Explain the class {name}."),
    "function": ("What does {name} do?", "Describe the function {name}."),
}


@dataclass(frozen=True)
class ChatPair:
    question: str
    answer: str


@dataclass
class Corpus:
    paragraphs: list[str]
    chats: list[ChatPair]
    sources: dict[str, str]  # source -> "version, licence"


def clean(text: str) -> str:
    """Strip reST roles and literal markup, keep the words."""
    text = REST_ROLE.sub(r"\1", text)
    return re.sub(r"\s+", " ", text.replace("``", "").replace("`", "").replace("**", "")).strip()


def is_prose(line: str) -> bool:
    """A line of mostly words: no doctest prompts, option tables or code punctuation."""
    if not PROSE_LINE.match(line) or line.startswith((">>>", "...")):
        return False
    words = WORD.findall(line)
    letters = sum(len(word) for word in words)
    return len(words) >= 3 and letters >= 0.75 * len(line.replace(" ", ""))


def paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a docstring, each cleaned and joined onto one line."""
    result = []
    for block in re.split(r"\n\s*\n", doc):
        lines = [clean(line) for line in block.splitlines()]
        if lines and all(is_prose(line) for line in lines):
            text = " ".join(lines)
            if len(text) >= 40:
                result.append(text)
    return result


def named_docstrings(source: str, module: str) -> list[tuple[str, str, str]]:
    """(kind, name, docstring) for the module, classes and functions of one source file."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        kind = {ast.Module: "module", ast.ClassDef: "class", ast.FunctionDef: "function"}.get(type(node))
        doc = ast.get_docstring(node) if kind else None
        if doc:
            name = module if kind == "module" else node.name
            found.append((kind, name, doc))
    return found


def sources_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts))


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def add_tree(root: Path, prefix: str, corpus: Corpus, seen: set[str]) -> None:
    for path in sources_under(root):
        module = ".".join(filter(None, (prefix, module_name(path, root))))
        for kind, name, doc in named_docstrings(path.read_text(encoding="utf-8", errors="replace"), module):
            prose = [p for p in paragraphs(doc) if p not in seen]
            seen.update(prose)
            corpus.paragraphs.extend(prose)
            if prose and not name.startswith("_") and doc.strip().startswith(prose[0][:20]):
                template = QUESTIONS[kind][len(corpus.chats) % 2]
                corpus.chats.append(ChatPair(template.format(name=name), prose[0]))


def language_reference(stdlib: Path) -> list[str]:
    """Prose of `pydoc_data/topics.py` (the language reference), read as a literal."""
    topics = ast.literal_eval(ast.parse((stdlib / "pydoc_data" / "topics.py").read_text()).body[-1].value)
    return [p for text in topics.values() for p in paragraphs(text)]


def dictionary(texts: list[str], min_count: int = 2) -> list[str]:
    """Lower-cased words seen at least `min_count` times: what "a word of the corpus" means in tests."""
    counts = Counter(word.lower() for text in texts for word in WORD.findall(text))
    return sorted(word for word, count in counts.items() if count >= min_count)


def build_corpus() -> Corpus:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    version = sysconfig.get_python_version()
    corpus = Corpus([], [], {f"Python {version} standard library + language reference": "PSF-2.0"})
    seen: set[str] = set()
    add_tree(stdlib, "", corpus, seen)
    reference = [p for p in language_reference(stdlib) if p not in seen]
    seen.update(reference)
    corpus.paragraphs.extend(reference)
    for package, (dist, licence) in PACKAGES.items():
        if (purelib / package).is_dir():
            add_tree(purelib / package, package, corpus, seen)
            corpus.sources[f"{dist} {importlib.metadata.version(dist)}"] = licence
    return corpus


if __name__ == "__main__":
    corpus = build_corpus()
    chars = sum(map(len, corpus.paragraphs))
    print(f"{len(corpus.paragraphs)} paragraphs, {chars} chars, {len(corpus.chats)} chat pairs")
    print(corpus.sources)
    for paragraph in corpus.paragraphs[3000:3006]:
        print("-", paragraph[:160])
    for pair in corpus.chats[2000:2006]:
        print("Q:", pair.question, "A:", pair.answer[:120])
