"""Stage 2: turn a dataset's raw files into the prepared format (see pipeline/prepared.py).

This is where dataset-specific code ends: ``pipeline/datasets/<name>.py`` knows its raw files and declares
its own ``PrepareParams`` (the ``<name>.prepare`` section of params.yaml), and every stage after this one
reads only the prepared format.
"""

from __future__ import annotations

import importlib
import time

from pipeline.atomic import write_json
from pipeline.params import load_params
from pipeline.prepared import Split, save_prepared
from pipeline.stage import DatasetPaths, StageError, run


def split_record(name: str, split: Split) -> dict:
    """Images and the fraction of (field-of-view) pixels that are foreground, for any dataset."""
    foreground = split.masks > 0
    counted = foreground.size if split.fov is None else int(split.fov.sum())
    if split.fov is not None:
        foreground &= split.fov
    return {"split": name, "images": len(split), "foreground_fraction": round(int(foreground.sum()) / max(counted, 1), 6)}


def prepare(dataset: str) -> str:
    start = time.perf_counter()
    name = f"pipeline.datasets.{dataset}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # the module exists but something it imports does not: a bug or a broken install
            raise
        raise StageError(f"no dataset module pipeline/datasets/{dataset}.py: prepare knows no dataset {dataset!r}") from None
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
