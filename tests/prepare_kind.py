"""A dataset kind's prepare, in a test: its plan written by the prepare stage's own code into a directory."""

from __future__ import annotations

from pathlib import Path

from pipeline.plans import Plan, write_plan
from pipeline.prepared import SPLITS, DatasetMeta, Split, load_split, open_splits


def prepare_kind(module, raw_dir: Path, params, directory: Path) -> tuple[DatasetMeta, dict[str, Split], dict]:
    """``(meta, splits in memory, the kind's summary)`` of ``module``'s dataset in ``raw_dir``, prepared into
    ``directory`` (images of one size per split: ``load_split`` stacks them)."""
    plan: Plan = module.plan(Path(raw_dir), params)
    _, tallies = write_plan(plan, Path(directory), recipe_digest="test")
    return (
        plan.meta,
        {name: load_split(directory, name) for name in SPLITS},
        plan.summarize(tallies, open_splits(directory)),
    )
