"""The package's shape: no import cycle between its modules (lazy and TYPE_CHECKING imports count), no module over
600 lines, scripts use public names only, and every bundle file name comes from matching.layout."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "matching"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}


def _imports(path: Path) -> set[str]:
    """Every matching module ``path`` imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("matching"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("matching"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    # a package's __init__ only re-exports (the front door): it is not a module of its own in the graph
    return {m for m in found if m in MODULES and m not in PACKAGES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items() if name not in PACKAGES}


def _cycle_from(start: str) -> list[str] | None:
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == start:
                return [*trail, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*trail, nxt]))
    return None


def test_the_graph_sees_lazy_and_type_checking_imports() -> None:
    assert "matching.training.scorer" in GRAPH["matching.matcher"]  # imported inside a method
    assert "matching.search" in GRAPH["matching.pairs"]  # imported under TYPE_CHECKING


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_import_cycle(module: str) -> None:
    assert _cycle_from(module) is None, " -> ".join(_cycle_from(module) or [])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_600_lines(module: str) -> None:
    assert len(MODULES[module].read_text(encoding="utf-8").splitlines()) <= 600


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_scripts_use_public_names_only(script: str) -> None:
    tree = ast.parse((ROOT / "scripts" / script).read_text(encoding="utf-8"))
    private = [
        f"{node.module}.{a.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("matching")
        for a in node.names
        if a.name.startswith("_") and a.name != "__version__"
    ]
    assert not private


def test_bundle_file_names_live_in_layout_only() -> None:
    from matching import layout

    names = {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)}
    for module, path in MODULES.items():
        if module == "matching.layout":
            continue
        literals = {
            n.value for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Constant)
        }
        assert not (names & literals), f"{module} spells bundle file names {sorted(names & literals)}"
