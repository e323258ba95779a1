"""Render an infra template: replace ``${NAME}`` / ``${NAME:-default}`` placeholders with values.

Usage (from the repository root; a template path may also be given relative to infra/)::

    python infra/render.py k8s/pretrain-torchrun-job.yaml NNODES=2 GPUS_PER_NODE=8 \\
        RUN_ID=codis-4m-01 IMAGE=registry.example.com/codis-pipeline:gpu > job.yaml
    kubectl apply -f job.yaml

Every placeholder without a default must be given; the error names all that are missing. A given
name the template does not use is an error too (a typo would otherwise be silently ignored).
Kubernetes' own ``$(NAME)`` references (expanded by the kubelet from the container's env) are left
alone. The result must parse as YAML (JSON is YAML), so a value that breaks the document fails here
rather than at ``kubectl apply``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RenderError(ValueError):
    """A template cannot be rendered with the given values; the message names the variables."""


def placeholders(text: str) -> dict[str, str | None]:
    """Names used in ``text``, each with its default (``None`` where the template gives none)."""
    found: dict[str, str | None] = {}
    for match in PLACEHOLDER.finditer(text):
        name, default = match.group(1), match.group(2)
        # One occurrence without a default makes the variable required.
        found[name] = None if (name in found and found[name] is None) else default
    return found


def render(text: str, values: Mapping[str, str], source: str = "template") -> str:
    """``text`` with its placeholders replaced; :class:`RenderError` names any bad variable."""
    used = placeholders(text)
    missing = sorted(name for name, default in used.items()
                     if default is None and name not in values)
    if missing:
        raise RenderError(f"{source}: unset variable(s): {', '.join(missing)} "
                          f"(pass them as NAME=value)")
    unknown = sorted(set(values) - set(used))
    if unknown:
        raise RenderError(f"{source}: unknown variable(s): {', '.join(unknown)} "
                          f"(the template uses: {', '.join(sorted(used))})")

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        return values[name] if name in values else (default or "")

    rendered = PLACEHOLDER.sub(substitute, text)
    try:
        list(yaml.safe_load_all(rendered))
    except yaml.YAMLError as exc:
        raise RenderError(f"{source}: the rendered text is not valid YAML: {exc}") from exc
    return rendered


def parse_assignments(args: Sequence[str]) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` -> ``{"A": "1", "B": "x=y"}``; raises on an argument without ``=``."""
    values: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RenderError(f"argument {arg!r}: expected NAME=value")
        values[name] = value
    return values


def resolve_template(path: str) -> Path:
    """``path`` as given, else relative to this folder (infra/)."""
    for candidate in (Path(path), Path(__file__).resolve().parent / path):
        if candidate.is_file():
            return candidate
    raise RenderError(f"{path}: no such template (looked in the working directory and infra/)")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        template = resolve_template(args[0])
        sys.stdout.write(render(template.read_text(), parse_assignments(args[1:]), source=args[0]))
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
