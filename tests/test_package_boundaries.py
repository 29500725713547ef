"""What may import what: the shared placement module needs nothing but the standard library, the SDK and the router
never import each other (both read from the source with ast), and the router, the CLI (with `nanocp run` and
`nanocp top`) and the simulator load without torch or numpy, which only a worker needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nanocp"
TORCH_FREE = (
    "nanocp.placement",
    "nanocp.client",
    "nanocp.router",
    "nanocp.router.server",
    "nanocp.cli",
    "nanocp.embedded",
    "nanocp.top",
    "nanocp.sim.loop",
    "nanocp.sim.cli",
)


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


def imports_of(path: Path) -> set[str]:
    return imported_modules(path.read_text(), ".".join(path.relative_to(PACKAGE.parent).parent.parts))


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


def test_the_shared_placement_module_imports_only_the_standard_library() -> None:
    imported = imports_of(PACKAGE / "placement.py")
    assert {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names} == set()


@pytest.mark.parametrize(("package", "forbidden"), [("client", "nanocp.router"), ("router", "nanocp.client")])
def test_the_sdk_and_the_router_do_not_import_each_other(package: str, forbidden: str) -> None:
    offending = {
        f"{path.relative_to(PACKAGE.parent)}: {module}"
        for path in (PACKAGE / package).rglob("*.py")
        for module in imports_of(path)
        if module == forbidden or module.startswith(forbidden + ".")
    }
    assert offending == set()


def test_the_router_the_cli_and_the_simulator_load_without_torch_or_numpy() -> None:
    # A fresh interpreter: this one has torch loaded by other tests.
    code = f"import sys, {', '.join(TORCH_FREE)}; print(sorted({{'torch', 'numpy'}} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]"
