"""The code a stage runs, as part of its key: ``{module: sha256[:12] of its source}``.

Changed codis code re-runs the stages whose code changed (and what depends on them), and each
stage marker records the code that produced its folder. A training, evaluation or report stage
hashes the codis module it calls and every codis module that imports, transitively. Data stages
hash their own code only (:data:`OWN_CODE_ONLY`): editing ``codis/config.py`` must not re-shard
COCO. The download stage hashes no codis code at all (re-downloading millions of images for an
edit of ``codis/data/download.py`` would be absurd): img2dataset's version stands for what it
writes.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

STAGE_ROOTS = {"generate_demo": "codis.data.demo_world", "shard": "codis.data.shards",
               "pretrain": "codis.train", "vision_init": "codis.train.vision_init",
               "text_assignment": "codis.tasks.nlvr", "report": "codis.report.collect",
               "analyze": "codis.report.analysis", "import_checkpoint": "codis.albef"}
"""The codis module each stage calls (finetune and evaluate: ``codis.tasks.<task>``)."""

OWN_CODE_ONLY = frozenset({"generate_demo", "shard"})
"""Stages that hash their root module only, or for a package the package and its submodules (and
:data:`ALSO_HASHED`)."""

ALSO_HASHED = {"generate_demo": ("codis.metrics",)}
"""Modules outside an own-code-only stage's package that decide what it writes: the demo world's
manifest scores its trivial baselines with the evaluation's metrics."""


class ModuleSource(NamedTuple):
    digest: str
    """sha256[:12] of the module's source file."""
    imports: tuple[str, ...]
    """Names of the modules (or of names inside them) it imports from its own package."""


_SOURCE_CACHE: dict[str, ModuleSource] = {}


def _source_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_package(name: str) -> bool:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    return spec is not None and spec.submodule_search_locations is not None


def module_source(name: str) -> ModuleSource | None:
    """The digest of a module's source (its ``__init__``'s for a package) and what it imports from
    its own top-level package (codis's modules: codis), or None if ``name`` is not a module (e.g.
    a function imported from a package)."""
    if name not in _SOURCE_CACHE:
        path = _source_file(name)
        if path is None:
            return None
        source = path.read_bytes()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        top = name.split(".")[0]
        imported: list[str] = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # "from .config import X" inside a package
                    base = importlib.util.resolve_name("." * node.level + base, package)
                if base.split(".")[0] != top:
                    continue
                if _is_package(base):  # "from codis.data import shards" names a module
                    imported += [f"{base}.{alias.name}" for alias in node.names]
                imported.append(base)
            elif isinstance(node, ast.Import):
                imported += [a.name for a in node.names if a.name.split(".")[0] == top]
        _SOURCE_CACHE[name] = ModuleSource(hashlib.sha256(source).hexdigest()[:12], tuple(imported))
    return _SOURCE_CACHE[name]


def package_modules(name: str) -> list[str]:
    """``name`` and, if it is a package, every module under it (subpackages included), sorted."""
    path = _source_file(name)
    if path is None:
        raise ValueError(f"{name}: not a Python module")
    if path.name != "__init__.py":
        return [name]
    found = []
    for file in path.parent.rglob("*.py"):
        parts = file.relative_to(path.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append(".".join((name, *parts)))
    return sorted(found)


def code_fingerprint(stage: str, task: str | None = None) -> dict[str, str]:
    """``{module: sha256[:12] of its source}`` of the code stage ``stage`` runs (see the module
    docstring); ``task``: the finetune or evaluate stage's task."""
    if stage == "download":
        return {"img2dataset": version("img2dataset")}
    root = f"codis.tasks.{task}" if stage in ("finetune", "evaluate") else STAGE_ROOTS.get(stage)
    if root is None:
        return {}
    if stage in OWN_CODE_ONLY:
        names = [*package_modules(root), *ALSO_HASHED.get(stage, ())]
        return {name: module_source(name).digest for name in sorted(names)}
    found: dict[str, str] = {}
    pending = [root, "codis"]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        module = module_source(name)
        if module is None:
            continue
        found[name] = module.digest
        pending += module.imports
    return dict(sorted(found.items()))
