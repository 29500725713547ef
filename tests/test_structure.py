"""Shape limits the code holds itself to (issue 14): files a person can read whole, functions that fit a screen."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanocp"
GENERATED = (PACKAGE / "v1", PACKAGE / "internal")  # protoc's output, never edited by hand
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # from `def` to the last line, decorators excluded


def product_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not any(p.is_relative_to(g) for g in GENERATED))


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method, nested ones too, with its qualified name (Class.method, outer.inner)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def over_the_limits() -> dict[str, int]:
    """Files and functions over their limit, with their length in lines."""
    over = {}
    for path in product_files():
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            over[name(path)] = len(source.splitlines())
        for qualified, node in functions(ast.parse(source)):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                over[f"{name(path)}::{qualified}"] = length
    return over


def test_no_file_over_400_lines_and_no_function_over_80() -> None:
    assert over_the_limits() == {}


def test_the_limits_see_nested_functions_and_methods() -> None:
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n\n\nasync def h():\n    pass\n")
    assert [(q, n.end_lineno - n.lineno + 1) for q, n in functions(tree) if n.end_lineno] == [
        ("A.f", 3),
        ("A.f.g", 2),
        ("h", 2),
    ]
