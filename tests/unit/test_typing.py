"""The package is typed (PEP 561): it ships py.typed, so type checkers read its annotations, and every public
function and method carries them (a missing one would be read as Any by users' type checkers)."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_mp

PACKAGE = Path(lightning_mp.__file__).parent


def test_py_typed_marker_is_in_the_package():
    assert (PACKAGE / "py.typed").is_file()


def test_public_functions_and_methods_are_annotated():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name.startswith("_") and path.name not in ("__init__.py", "__main__.py"):
            continue  # private modules (_compat.py)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_") and node.name != "__init__":
                continue
            unannotated = [a.arg for a in node.args.args + node.args.kwonlyargs
                           if a.annotation is None and a.arg not in ("self", "cls")]
            if node.returns is None or unannotated:
                missing.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"
                               f"{' (return)' if node.returns is None else ''} {' '.join(unannotated)}")
    assert not missing, "public functions without annotations:\n" + "\n".join(missing)
