"""The house rules of the package that import-linter does not state (see docs/CONVENTIONS.md):
modules stay small, private names stay in their module. The import layers themselves are the
`[tool.importlinter]` contracts of pyproject.toml, checked by `make test` (`lint-imports`)."""

from __future__ import annotations

import ast
from pathlib import Path

import lumbar_ray

PACKAGE = Path(lumbar_ray.__file__).parent
MAX_MODULE_LINES = 600


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_a_subpackage():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {"dicom", "models", "training", "scoring", "outputs", "synth", "bench", "metrics"} <= subpackages
    top_level = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top_level <= {"targets", "errors", "config", "storage", "runtime", "cli", "demo"}, top_level


def test_no_module_over_600_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in _modules()}
    too_big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_big, f"modules over {MAX_MODULE_LINES} lines: {too_big}"


def test_private_names_are_not_imported_across_modules():
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lumbar_ray"):
                offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders
