"""Stage 2: turn a dataset's raw files into the prepared format (see pipeline/prepared.py).

This is where dataset-specific code ends. params.yaml's ``datasets`` maps each dataset's name to its kind, the
module ``pipeline/datasets/<kind>.py`` that knows its raw files and declares its own ``PrepareParams`` (the
``<name>.prepare`` section): ``mnist`` and ``stare`` for the built-in datasets, ``folder`` for any folder of
images and masks described in params.yaml alone. Every stage after this one reads only the prepared format.
"""

from __future__ import annotations

import importlib
import time

from pipeline.atomic import write_json
from pipeline.params import PARAMS_FILE, ParamError, load_params, read_params_file
from pipeline.prepared import Split, save_prepared
from pipeline.stage import DatasetPaths, StageError, run


def split_record(name: str, split: Split) -> dict:
    """Images and the fraction of (field-of-view) pixels that are foreground, for any dataset."""
    foreground = split.masks > 0
    counted = foreground.size if split.fov is None else int(split.fov.sum())
    if split.fov is not None:
        foreground &= split.fov
    return {"split": name, "images": len(split), "foreground_fraction": round(int(foreground.sum()) / max(counted, 1), 6)}


# The dataset kinds, each a module pipeline/datasets/<kind>.py with a PrepareParams and a prepare(). A list,
# not whatever the name imports: "__init__" or "os" would import something that is no kind.
KINDS = ("folder", "mnist", "stare")


def dataset_kind(dataset: str) -> str:
    """The kind of ``dataset``, from params.yaml's ``datasets`` mapping (name: kind)."""
    datasets = read_params_file().get("datasets")
    where = f"{PARAMS_FILE}: datasets"
    if not isinstance(datasets, dict):
        raise ParamError(f"{where}: expected a mapping of dataset name to kind (mnist: mnist, leaves: folder), "
                         f"got {datasets!r:.60}")
    if dataset not in datasets:
        raise ParamError(f"{where}: no dataset {dataset!r} (datasets: {', '.join(map(str, datasets))})")
    kind = datasets[dataset]
    if not isinstance(kind, str) or kind not in KINDS:
        raise ParamError(f"{where}.{dataset}: no kind {kind!r:.60} (a kind is a module of pipeline/datasets/); "
                         f"kinds: {', '.join(KINDS)}")
    return kind


def prepare(dataset: str) -> str:
    start = time.perf_counter()
    kind = dataset_kind(dataset)
    module = importlib.import_module(f"pipeline.datasets.{kind}")
    settings = load_params(dataset, "prepare", module.PrepareParams)
    paths = DatasetPaths(dataset)
    if not paths.raw.is_dir():
        raise StageError(f"{paths.raw}: not found; run the download stage first")
    meta, splits, summary = module.prepare(paths.raw, settings)
    save_prepared(paths.prepared, meta, splits)
    # The list first: `dvc plots` draws a JSON file's first list (dvc.yaml), the dataset's own summary follows.
    write_json(paths.metrics / "data.json", {"splits": [split_record(name, split) for name, split in splits.items()],
                                              **summary})
    sizes = ", ".join(f"{name} {len(split)}" for name, split in splits.items())
    return f"prepare {dataset}: {sizes} images in {time.perf_counter() - start:.1f} s -> {paths.prepared}"


if __name__ == "__main__":
    run(prepare)
