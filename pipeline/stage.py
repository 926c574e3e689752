"""What every stage shares: its command line, how it reports the user's mistakes, where its artifacts live.

Each stage module ends with ``if __name__ == "__main__": stage.run(<stage function>)``, which makes it
``python -m pipeline.<stage> <dataset>``. The stage function takes the dataset's name and returns the line
to print when it succeeds.

Errors come in two kinds. A :class:`StageError` is raised where the program knows the user is at fault -- a
bad parameter, a missing or malformed input file, a checkpoint that does not fit the data -- and its message
names the file or the key and says what is wrong: it is printed as one line, exit status 1. Anything else is
a bug in segpipe (or in a library) and keeps its traceback, so that it can be reported and fixed.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class StageError(Exception):
    """The user's input is wrong; the message names the file or key and what is wrong with it."""


# A dataset's name becomes directory names (data/raw/<name>, ...), a params.yaml key prefix (<name>.train) and a
# DVC stage name: a plain name, so that no path can climb out (`..`, `/`) and no key can split (`.`).
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
MAX_DATASET_NAME = 64  # characters: room for the temporary names built from it (pipeline/atomic.py)


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        return "letters, digits, '_' and '-'"
    if len(name) > MAX_DATASET_NAME:
        return f"at most {MAX_DATASET_NAME} characters"
    return None


def shown_name(name: str) -> str:
    """``name`` as an error line shows it: quoted (and cut short) unless it is a dataset name, so that the line
    stays one line whatever was typed."""
    return f"{name!r:.80}" if _name_problem(name) else name


def dataset_name(name: object, where: str = "dataset") -> str:
    """``name`` if it is a dataset name, else a StageError saying what one is (``where``: the key it came from)."""
    if problem := _name_problem(name):
        raise StageError(f"{where}: {name!r:.80} is not a dataset name ({problem})")
    return name


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes for one dataset; dvc.yaml declares the same paths."""

    dataset: str

    def __post_init__(self) -> None:  # every path below is derived from a checked name
        dataset_name(self.dataset)

    @property
    def raw(self) -> Path:  # download: the verified original files
        return Path("data/raw") / self.dataset

    @property
    def prepared(self) -> Path:  # prepare: the prepared format (pipeline/prepared.py)
        return Path("data/prepared") / self.dataset

    @property
    def model(self) -> Path:  # train: the checkpoint (pipeline/checkpoint.py)
        return Path("data/models") / self.dataset / "model.pt"

    @property
    def metrics(self) -> Path:  # data.json, eval.json, training curves, pictures: small, tracked by git
        return Path("metrics") / self.dataset

    @property
    def evaluation(self) -> Path:  # evaluate: per-class and per-image scores, every score, the confusion matrix
        return self.metrics / "evaluation.json"


def main(stage: Callable[[str], str], argv: list[str] | None = None) -> int:
    """Parse ``<dataset>``, run ``stage`` on it and print its summary; a StageError is one line and exit 1."""
    module = sys.modules[stage.__module__]
    # Run as `python -m pipeline.train`, the function's module is __main__; its spec keeps the real name.
    qualified = getattr(module, "__spec__", None) and module.__spec__.name or stage.__module__
    name = qualified.rsplit(".", 1)[-1]
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.{name}", description=(module.__doc__ or "").strip().partition("\n")[0]
    )
    parser.add_argument("dataset", help="a dataset section of params.yaml, e.g. mnist")
    args = parser.parse_args(argv)
    try:
        summary = stage(dataset_name(args.dataset))
    except StageError as e:
        print(f"{name} {shown_name(args.dataset)}: error: {e}", file=sys.stderr)
        return 1
    print(summary, flush=True)
    return 0


def run(stage: Callable[[str], str]) -> None:
    sys.exit(main(stage))
