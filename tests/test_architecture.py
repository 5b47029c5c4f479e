"""The package's structure, checked: the rules pyproject.toml's import-linter contracts cannot express."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "harness"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_sources_found() -> None:
    assert len(SOURCES) > 40 and (PACKAGE / "settings.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_imported_from_another_module(path: Path) -> None:
    """`from harness.x import _y` (and `import harness.x._y`) reach into another module's internals."""
    bad = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            modules = node.module.split(".")
            bad += [f"{node.module}.{a.name}" for a in node.names if _private(a.name)]
            bad += [node.module] * any(_private(m) for m in modules)
        elif isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.startswith("harness") and any(
                _private(m) for m in a.name.split("."))]
    assert not bad, f"{path.name} imports private names of other modules: {bad}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_harness_imports_at_module_level(path: Path) -> None:
    """An import of a harness module inside a function hides a dependency from the layers contract."""
    nested = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("harness"):
                    nested.append(f"line {inner.lineno}: from {inner.module}")
                elif isinstance(inner, ast.Import) and any(a.name.startswith("harness") for a in inner.names):
                    nested.append(f"line {inner.lineno}: import")
    assert not nested, f"{path.name}: {nested}"


def test_environment_switches_read_in_one_module() -> None:
    readers = [p.relative_to(PACKAGE).as_posix() for p in SOURCES if "HARNESS_" in p.read_text(encoding="utf-8")]
    assert readers == ["settings.py"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.name} has {lines} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(_tree(path))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {long}"


def test_checkpoints_never_unpickled() -> None:
    """Every torch.load in the package passes weights_only=True."""
    calls = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((path.name, node.lineno, safe))
    assert calls and all(safe for _, _, safe in calls), calls


def test_no_session_narrative_in_code() -> None:
    """Docstrings and comments describe the code, not the history of its making."""
    pattern = re.compile(r"\b(\w+th|first|second|third|this|previous|earlier|later|next) sessions?\b"
                         r"|\b\d{2}:\d{2} UTC\b", re.IGNORECASE)
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in SOURCES
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not hits, hits
