"""The import graph of ``codis/`` and ``flows/`` is acyclic, read from the source (every import
statement, function-local ones included, except those under ``if TYPE_CHECKING:``).

An edge goes from a module to the module an import statement names: ``import a.b`` and ``from a
import b`` (``b`` a submodule) name ``a.b``; ``from a.b import name`` names ``a.b``. The parent
packages that Python initialises on the way are not edges, so a package's ``__init__`` that
re-exports its submodules is no cycle with them; a submodule that imports a name from its own
package's ``__init__`` while that ``__init__`` imports it back is one."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("codis", "flows")


def module_files() -> dict[str, Path]:
    """``{module name: source file}`` of every module under :data:`PACKAGES`."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    nodes, pending = [], [tree]
    while pending:
        node = pending.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending += node.orelse
            continue
        pending += ast.iter_child_nodes(node)
    return nodes


def imported_modules(name: str, path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """``(module, inside a function)`` for each import of one of ``modules`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {id(node) for function in ast.walk(tree)
             if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else base)
        for target in targets:
            if target in modules and target != name:
                found.append((target, id(node) in local))
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: {target for target, _ in imported_modules(name, path, set(files))}
            for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert {"codis.model", "codis.data.shards", "flows.stages"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_flows_modules_import_each_other_at_module_level_only() -> None:
    """A function-local import of another ``flows`` module is how a cycle hides."""
    files = module_files()
    local = [f"{name} imports {target} inside a function"
             for name, path in files.items() if name.startswith("flows")
             for target, inside in imported_modules(name, path, set(files))
             if inside and target.startswith("flows")]
    assert local == []


def test_the_flows_graph_is_the_documented_dag() -> None:
    graph = import_graph()
    flows = {name: {t for t in targets if t.startswith("flows.")}
             for name, targets in graph.items() if name.startswith("flows.")}
    assert flows["flows.stages"] >= {"flows.recipe", "flows.store", "flows.tracking"}
    assert flows["flows.reproduce"] >= {"flows.stages", "flows.compare"}
    assert flows["flows.compare"] == {"flows.tracking"}
    for low in ("flows.recipe", "flows.store", "flows.tracking"):
        assert not flows[low] & {"flows.stages", "flows.reproduce", "flows.compare"}, low


@pytest.mark.parametrize("source, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a.x"}, "a.x": set()}, None),
])
def test_find_cycle(source: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(source) == expected


def test_edges_follow_what_an_import_names(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from pkg.sub import thing\n")
    (package / "sub.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.other\n"
        "def f():\n    from . import other\n    from pkg import thing\n")
    (package / "other.py").write_text("")
    modules = {"pkg", "pkg.sub", "pkg.other"}
    assert imported_modules("pkg", package / "__init__.py", modules) == [("pkg.sub", False)]
    # the annotation-only import is no edge; "from pkg import thing" names the package itself
    assert sorted(imported_modules("pkg.sub", package / "sub.py", modules)) == [
        ("pkg", True), ("pkg.other", True)]
