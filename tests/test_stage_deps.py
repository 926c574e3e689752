"""dvc.yaml lists, for every stage, exactly the code that stage runs: no more (a change elsewhere would rerun
it for nothing), no less (a change to code it runs would not rerun it). "Runs" is read from the imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
DATASETS = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]
STAGE_MODULES = {"pipeline." + name for name in DVC_YAML["stages"]}


def pipeline_imports(module: str) -> set[str]:
    """The ``pipeline.*`` modules that ``module`` imports anywhere in its source (function-level imports too)."""
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            # `from pipeline import x` imports the module pipeline.x; `from pipeline.x import y` imports pipeline.x.
            found |= {f"pipeline.{a.name}" for a in node.names} if node.module == "pipeline" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
    return found


def closure(modules: set[str]) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += pipeline_imports(module)
    return seen


def as_paths(modules: set[str]) -> set[str]:
    return {module.replace(".", "/") + ".py" for module in modules}


def declared_code(stage: str, dataset: str, kind: str) -> set[str]:
    deps = DVC_YAML["stages"][stage]["do"]["deps"]
    return {
        d.replace("${key}", dataset).replace("${item}", kind)
        for d in deps
        if d.startswith("pipeline/") and d.endswith(".py")
    }


# Every kind of dataset, not only those params.yaml uses: a folder dataset's stages must be exact too.
KINDS = {
    **{path.stem: path.stem for path in (REPO / "pipeline/datasets").glob("*.py") if path.stem != "__init__"},
    **DATASETS,
}


@pytest.mark.parametrize("dataset", sorted(KINDS))
@pytest.mark.parametrize("stage", sorted(DVC_YAML["stages"]))
def test_deps_are_exactly_the_code_the_stage_imports(stage, dataset):
    entry = {f"pipeline.{stage}"}
    expected = set()
    if stage == "prepare":  # prepare imports the dataset's module, named by its kind, at run time
        entry.add(f"pipeline.datasets.{KINDS[dataset]}")
        # One deps list serves every kind: it holds the library modules that any kind imports.
        kinds = {f"pipeline.datasets.{kind}" for kind in set(KINDS.values())}
        expected = {path for path in as_paths(closure(kinds)) if not path.startswith("pipeline/datasets/")}
    assert declared_code(stage, dataset, KINDS[dataset]) == as_paths(closure(entry)) | expected


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_no_stage_imports_another_stage(stage):
    assert closure({stage}) & STAGE_MODULES == {stage}


def test_package_inits_hold_no_code():
    # An __init__ runs on every import of its package but is listed in no stage's deps: it must stay empty.
    for init in (REPO / "pipeline").rglob("__init__.py"):
        assert init.read_text().strip() == "", init


def test_every_imported_library_is_a_declared_dependency():
    import sys
    from importlib.metadata import packages_distributions

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name.lower().replace("_", "-") for r in project["dependencies"]}
    providers = packages_distributions()
    undeclared = set()
    for source in (REPO / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top == "pipeline" or top in sys.stdlib_module_names:
                    continue
                distributions = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not distributions & declared:
                    undeclared.add(f"{source.relative_to(REPO)}: {top} ({', '.join(sorted(distributions))})")
    assert not undeclared, sorted(undeclared)
