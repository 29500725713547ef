"""Shape limits the code holds itself to (issue 14): files a person can read whole, functions that fit a screen, and
an SDK and a router that do not import each other."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanocp"
GENERATED = (PACKAGE / "v1", PACKAGE / "internal")  # protoc's output, never edited by hand
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80  # from `def` to the last line, decorators excluded

# Over a limit today in code that another branch is rewriting; each entry goes when that branch merges (the test
# fails on an entry that is no longer over, so none outlives its reason). Keys: a file, or file::qualified name.
ALLOWED_OVER = {
    "nanocp/sim/loop.py": "431 lines; branch placement moves its placement code out",
    "nanocp/worker/step_plan.py::build": "129 lines; the engine rewrite makes it a planner object",
}


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
    over = over_the_limits()
    assert set(over) <= set(ALLOWED_OVER), {k: v for k, v in over.items() if k not in ALLOWED_OVER}
    assert set(ALLOWED_OVER) <= set(over), (
        f"back within the limits, so off ALLOWED_OVER: {set(ALLOWED_OVER) - set(over)}"
    )


def test_the_limits_see_nested_functions_and_methods() -> None:
    tree = ast.parse("class A:\n    def f(self):\n        def g():\n            pass\n\n\nasync def h():\n    pass\n")
    assert [(q, n.end_lineno - n.lineno + 1) for q, n in functions(tree) if n.end_lineno] == [
        ("A.f", 3),
        ("A.f.g", 2),
        ("h", 2),
    ]


def imported_modules(source: str, package: str) -> set[str]:
    """The absolute names of the modules a file of `package` imports anywhere in it (inside functions too), with
    relative imports resolved; `from a import b` counts as a and a.b, since b may be a module."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            modules |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return modules


def imports_of(package: str) -> set[str]:
    """What the files of nanocp.`package` import."""
    return {
        module
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for module in imported_modules(path.read_text(), ".".join(path.relative_to(ROOT).parent.parts))
    }


def test_imports_are_found_in_functions_too_and_relative_ones_resolved() -> None:
    source = (
        "import grpc\nfrom ..router import placement\nfrom . import chunk\ndef f():\n    from nanocp.sim import loop\n"
    )
    assert imported_modules(source, "nanocp.client") == {
        "grpc",
        "nanocp.router",
        "nanocp.router.placement",
        "nanocp.client",
        "nanocp.client.chunk",
        "nanocp.sim",
        "nanocp.sim.loop",
    }


@pytest.mark.xfail(strict=True, reason="removed on branch placement")
def test_the_sdk_and_the_router_do_not_import_each_other() -> None:
    def inside(modules: set[str], package: str) -> set[str]:
        return {m for m in modules if m == package or m.startswith(package + ".")}

    assert not inside(imports_of("router"), "nanocp.client"), "the router imports the SDK"
    assert not inside(imports_of("client"), "nanocp.router"), "the SDK imports the router"
