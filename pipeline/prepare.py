"""Stage 2: turn a dataset's raw files into the prepared format (pipeline/prepared.py), where dataset-specific
code ends. params.yaml's ``datasets`` maps each dataset to its kind, a module ``pipeline/datasets/<kind>.py`` with
its ``PrepareParams`` and a ``plan``, which pipeline/plans.py decodes and writes.
"""

from __future__ import annotations

import importlib
import time

from pipeline import prepared
from pipeline.atomic import write_json
from pipeline.params import PARAMS_FILE, ParamError, load_params, read_params_file
from pipeline.plans import Plan, recipe, summary, write_plan
from pipeline.stage import DatasetPaths, StageError, run

# A list, not whatever the name imports: "__init__" or "os" would import something that is no kind.
KINDS = ("folder", "mnist", "stare")


def dataset_kind(dataset: str) -> str:
    datasets = read_params_file().get("datasets")
    where = f"{PARAMS_FILE}: datasets"
    if not isinstance(datasets, dict):
        raise ParamError(
            f"{where}: expected a mapping of dataset name to kind (mnist: mnist, leaves: folder), got {datasets!r:.60}"
        )
    if dataset not in datasets:
        raise ParamError(f"{where}: no dataset {dataset!r} (datasets: {', '.join(map(str, datasets))})")
    kind = datasets[dataset]
    if not isinstance(kind, str) or kind not in KINDS:
        raise ParamError(
            f"{where}.{dataset}: no kind {kind!r:.60} (a kind is a module of pipeline/datasets/); "
            f"kinds: {', '.join(KINDS)}"
        )
    return kind


def prepare(dataset: str) -> str:
    start = time.perf_counter()
    kind = dataset_kind(dataset)
    module = importlib.import_module(f"pipeline.datasets.{kind}")
    settings = load_params(dataset, "prepare", module.PrepareParams)
    paths = DatasetPaths(dataset)
    if not paths.raw.is_dir():
        raise StageError(f"{paths.raw}: not found; run the download stage first")
    plan: Plan = module.plan(paths.raw, settings)
    # The shard size is fixed, not a param: a param would be part of every sample's fingerprint.
    decoded_count, tallies = write_plan(plan, paths.prepared, recipe(kind, module, settings), prepared.SHARD_BYTES)
    data = summary(plan, paths.prepared, tallies)
    write_json(paths.metrics / "data.json", data)
    sizes = ", ".join(f"{record['split']} {record['images']}" for record in data["splits"])
    kept = sum(len(s) for s in plan.splits.values()) - decoded_count
    return (
        f"prepare {dataset}: {sizes} images ({decoded_count} decoded, {kept} kept) in "
        f"{time.perf_counter() - start:.1f} s -> {paths.prepared}"
    )


if __name__ == "__main__":
    run(prepare)
