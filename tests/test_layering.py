"""The package's layers, checked on the source (every import, function-local ones included):
the model core never imports what runs things, and nothing in codis imports the orchestration."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CODIS = Path(__file__).resolve().parents[1] / "codis"
SUBPACKAGES = ("train", "tasks", "data", "report")
# Who may import which subpackage (the core, codis/*.py, may be imported by everyone).
ALLOWED = {
    "core": set(),
    "data": {"data"},
    "train": {"train", "data"},
    "tasks": {"tasks", "train", "data"},
    "report": {"report", "data", "tasks"},  # the analysis encodes with the retrieval task's code
    "cli": {"train", "tasks", "data"},
}
FORBIDDEN = ("flows", "prefect", "mlflow", "img2dataset", "fastapi", "pydantic")


def _layer(path: Path) -> str:
    relative = path.relative_to(CODIS)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return "cli" if relative.name == "cli.py" else "core"


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "codis":  # "from codis import train" names a subpackage
                names += [f"codis.{alias.name}" for alias in node.names]
    return names


MODULES = sorted(CODIS.rglob("*.py"))


def test_every_layer_is_known():
    assert {_layer(p) for p in MODULES} == set(ALLOWED)
    assert {p.name for p in CODIS.iterdir() if p.is_dir() and (p / "__init__.py").exists()} \
        == set(SUBPACKAGES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(CODIS)))
def test_a_module_imports_only_what_its_layer_may(path: Path):
    layer = _layer(path)
    for name in _imports(path):
        parts = name.split(".")
        assert parts[0] not in FORBIDDEN, f"{path.relative_to(CODIS)} imports {name}"
        if parts[0] == "codis" and len(parts) > 1 and parts[1] in SUBPACKAGES:
            assert parts[1] in ALLOWED[layer], \
                f"{path.relative_to(CODIS)} ({layer}) imports {name}"


def test_the_check_sees_function_local_imports(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from codis import tasks\n    import mlflow\n")
    assert set(_imports(module)) >= {"codis.tasks", "mlflow"}


def test_the_library_installs_without_the_orchestration_stack():
    import re
    import tomllib

    project = tomllib.loads((CODIS.parent / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[=<>\[ ;]", d)[0].lower() for d in project["dependencies"]}
    assert not names & {*FORBIDDEN, "matplotlib", "mlflow", "pot"}, names
    extras = project["optional-dependencies"]
    assert {"img2dataset", "prefect", "mlflow", "matplotlib"} <= {
        re.split(r"[=<>\[ ;]", d)[0].lower() for group in ("data", "flows", "report") for d in extras[group]}
    assert extras["all"] == ["codis-pipeline[data,report,flows,dev]"]
