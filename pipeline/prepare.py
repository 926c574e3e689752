"""Stage 2: turn a dataset's raw files into the prepared format (see pipeline/artifacts.py).

This is where dataset-specific code ends: ``pipeline/datasets/<name>.py`` knows its raw files, and every
stage after this one reads only the prepared format.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from pipeline import params as params_module
from pipeline.archives import ArchiveError
from pipeline.artifacts import DatasetPaths, save_prepared, write_json


def prepare(dataset: str) -> dict:
    params = params_module.load(dataset, "prepare")
    try:
        module = importlib.import_module(f"pipeline.datasets.{dataset}")
    except ModuleNotFoundError:
        raise ValueError(f"no dataset module pipeline/datasets/{dataset}.py: prepare knows no dataset {dataset!r}") from None
    paths = DatasetPaths(dataset)
    if not paths.raw.is_dir():
        raise FileNotFoundError(f"{paths.raw}: not found; run the download stage first")
    meta, splits, summary = module.prepare(paths.raw, params)
    save_prepared(paths.prepared, meta, splits)
    write_json(paths.metrics / "data.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = prepare(args.dataset)
    except (FileNotFoundError, ValueError, ArchiveError) as e:  # ParamError is a ValueError
        print(f"prepare {args.dataset}: error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{k} {v['images']}" for k, v in summary.items() if isinstance(v, dict) and "images" in v)
    print(f"prepare {args.dataset}: {sizes} images in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
