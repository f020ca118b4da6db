"""The test suite's own layout: shared builders come from tests/support (or conftest fixtures),
never from another test module, so every module runs alone and in any order."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_a_test_module_or_conftest():
    files = sorted(TESTS.rglob("*.py"))
    test_modules = {p.stem for p in files if p.name.startswith("test_")} | {"conftest"}
    offenders = {str(p.relative_to(TESTS)): sorted(_imported_modules(p) & test_modules) for p in files}
    assert not {k: v for k, v in offenders.items() if v}, "import shared code from tests/support instead"


def test_support_holds_no_tests():
    support = TESTS / "support"
    assert (support / "__init__.py").is_file()
    assert not [p.name for p in support.rglob("*.py") if p.name.startswith("test_") or p.name == "conftest.py"]
