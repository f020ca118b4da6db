"""The package's layers import one way, and no module imports itself back through others.

    config, errors, utils, version, shards, imageio  <-  model  <-  {data, eval}  <-  train  <-  {demo, experiments}  <-  cli
    search  <-  model, eval
    hygiene  <-  model, data, eval, search      (and hygiene  <-  cli)

Nothing below the CLI imports the front door (``clipforge/__init__.py``, ``api.py``). Imports
inside functions count too: a lazy import is still an arrow. ``if TYPE_CHECKING:`` blocks do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "clipforge"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE

BASE = {"config", "errors", "utils", "version", "shards", "imageio"}
FRONT = {"<root>", "api"}  # the front door: clipforge/__init__.py, api.py
# What each layer may import, besides itself and the base modules.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "model": set(),
    "data": {"model"},
    "eval": {"model"},
    "explanations": {"model"},
    "search": {"model", "eval", "explanations"},
    "hygiene": {"model", "data", "eval", "search"},
    "train": {"model", "data", "eval"},
    "demo": {"model", "data", "eval", "train"},
    "experiments": {"model", "data", "eval", "train"},
    "front": {"model", "explanations"},
    "cli": {"model", "data", "eval", "explanations", "train", "demo", "experiments", "search", "hygiene", "front"},
    "__main__": {"cli"},
}
# Inside search/, the readers never import the writers.
SEARCH_READERS = {"searcher", "service", "http"}
SEARCH_WRITERS = {"build", "embed"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "<root>"
    if top in BASE:
        return "base"
    if top in FRONT:
        return "front"
    return top


def _module_name(path: Path, root: Path) -> str:
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = _module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != root.name:
                    continue
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if _is_module(sub, root) else source)
        targets.discard(name)
        graph[name] = targets
    return graph


def backward_arrows(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for mod, targets in graph.items():
        src = layer_of(mod)
        for tgt in sorted(targets):
            dst = layer_of(tgt)
            if dst == src or dst == "base":
                continue
            if dst not in ALLOWED.get(src, set()):
                found.append(f"{mod} ({src}) imports {tgt} ({dst})")
    for mod, targets in graph.items():
        parts = mod.split(".")
        if len(parts) == 3 and parts[1] == "search" and parts[2] in SEARCH_READERS:
            for tgt in sorted(targets):
                t = tgt.split(".")
                if len(t) >= 3 and t[1] == "search" and t[2] in SEARCH_WRITERS:
                    found.append(f"{mod} (search reader) imports {tgt} (search writer)")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_layers_import_one_way():
    graph = import_graph(SRC)
    assert len(graph) > 50, "the package was not found"
    assert backward_arrows(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph(SRC)) == []


# The checker itself: a small package with one of each fault must be caught.
@pytest.fixture
def toy(tmp_path: Path):
    root = tmp_path / PACKAGE

    def write(rel: str, text: str = "") -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for rel in ("__init__.py", "api.py", "config.py", "model/__init__.py", "model/clip.py", "train/__init__.py",
                "train/trainer.py", "search/__init__.py", "search/build.py", "search/searcher.py", "cli/__init__.py"):
        write(rel)
    write("train/trainer.py", "from clipforge.model.clip import CLIP\nfrom clipforge import config\n")
    write("cli/__init__.py", "import clipforge\nfrom clipforge.train import trainer\n")
    return root, write


def test_checker_accepts_a_clean_tree(toy):
    root, _ = toy
    graph = import_graph(root)
    assert graph["clipforge.train.trainer"] == {"clipforge.model.clip", "clipforge.config"}
    assert backward_arrows(graph) == [] and cycles(graph) == []


@pytest.mark.parametrize("rel, text, expect", [
    ("model/clip.py", "def f():\n    from clipforge.train.trainer import x\n", "clipforge.model.clip (model) imports"),
    ("model/clip.py", "import clipforge\n", "imports clipforge (front)"),
    ("model/clip.py", "from clipforge.api import load\n", "imports clipforge.api (front)"),
    ("train/trainer.py", "from .. import cli\n", "imports clipforge.cli (cli)"),
    ("search/searcher.py", "from clipforge.search.build import x\n", "(search reader) imports"),
    ("search/build.py", "from clipforge.train import trainer\n", "imports clipforge.train.trainer (train)"),
])
def test_checker_catches_a_backward_import(toy, rel, text, expect):
    root, write = toy
    write(rel, text)
    found = backward_arrows(import_graph(root))
    assert any(expect in line for line in found), found


def test_checker_catches_a_cycle_but_not_type_checking_imports(toy):
    root, write = toy
    write("model/clip.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from clipforge.train import trainer\n")
    assert backward_arrows(import_graph(root)) == []
    write("search/build.py", "from clipforge.search import searcher\n")
    write("search/searcher.py", "def f():\n    from . import build\n")
    graph = import_graph(root)
    assert cycles(graph) == [["clipforge.search.build", "clipforge.search.searcher"]]
