"""The shape of the code (docs/architecture.md): layers imported one way, no import circle, short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 100


def test_import_contracts_hold():
    """pyproject's import-linter contracts: the layers, tasks that do not import each other, no facade imports."""
    run = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert "0 broken" in run.stdout


def test_no_import_circle():
    """No module reaches itself through imports, counting imports inside functions."""
    graph = grimp.build_graph("dgmr_jax")
    circles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert circles == []


def test_no_function_over_100_lines():
    long = []
    for path in sorted((ROOT / "dgmr_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_front_page_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
