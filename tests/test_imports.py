"""The shape of the code, read from its imports: stages are thin scripts over a library. No stage imports another
stage (predict and manifest included), the library never imports a stage, and no modules import each other in a
cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Every command a user runs: the DVC stages, and the two tools beside them.
STAGES = {f"pipeline.{name}" for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]} | {
    "pipeline.predict",
    "pipeline.manifest",
}
MODULES = {
    ".".join(path.relative_to(REPO).with_suffix("").parts)
    for path in (REPO / "pipeline").rglob("*.py")
    if path.name != "__init__.py"
}


def imports(module: str) -> set[str]:
    """The segpipe modules that ``module`` imports anywhere in its source (function-level imports too)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            names = {f"{node.module}.{a.name}" for a in node.names}
            found |= (names & MODULES) or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
    return found & MODULES


def test_the_modules_are_found():
    assert STAGES <= MODULES and len(MODULES - STAGES) > 10


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_imports_another_stage(stage):
    assert imports(stage) & STAGES == set()


@pytest.mark.parametrize("module", sorted(MODULES - STAGES))
def test_the_library_imports_no_stage(module):
    assert imports(module) & STAGES == set()


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join([*path, module])
        state[module] = "open"
        for imported in sorted(imports(module)):
            visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(MODULES):
        visit(module, [])
