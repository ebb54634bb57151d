"""The architecture stays visible: imports point down only, and only console.py prints."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "targan_cli"

# For each layer, the modules it must never import (its own layer and those below are fine).
FORBIDDEN = {
    "core": ("targan_cli.io", "targan_cli.data", "targan_cli.workflows", "targan_cli.cli",
             "targan_cli.console", "typer", "rich", "huggingface_hub", "nibabel", "pydicom",
             "SimpleITK", "PIL"),
    "io": ("targan_cli.data", "targan_cli.workflows", "targan_cli.cli", "targan_cli.console",
           "typer", "rich"),
    "data": ("targan_cli.workflows", "targan_cli.cli", "targan_cli.console", "typer", "rich"),
    "workflows": ("targan_cli.cli", "targan_cli.console", "typer", "rich"),
}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def library_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent.name in FORBIDDEN)


@pytest.mark.parametrize("path", library_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_imports_point_down(path):
    bad = sorted(m for m in imported_modules(path)
                 for forbidden in FORBIDDEN[path.parent.name]
                 if m == forbidden or m.startswith(forbidden + "."))
    assert not bad, f"{path.parent.name}/{path.name} imports {bad}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_only_console_prints(path):
    if path.name in ("console.py", "cli.py"):
        return
    calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not calls, f"{path.name} calls print() on line(s) {calls}"
