"""What every stage shares: its command line, how it reports the user's mistakes, where its artifacts live.

``stage.run(<stage function>)`` makes a module ``python -m pipeline.<stage> <dataset>``. A :class:`StageError`
(the user is at fault) is printed as one line, exit status 1; anything else is a bug and keeps its traceback.
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


# A dataset's name becomes directory names, a params.yaml key prefix and a DVC stage name: no `..`, `/` or `.`.
DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
MAX_DATASET_NAME = 64  # characters: room for the temporary names built from it (pipeline/atomic.py)


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        return "letters, digits, '_' and '-'"
    if len(name) > MAX_DATASET_NAME:
        return f"at most {MAX_DATASET_NAME} characters"
    return None


def shown_name(name: str) -> str:
    """``name`` as an error line shows it: quoted (and cut short) unless it is a dataset name."""
    return f"{name!r:.80}" if _name_problem(name) else name


def dataset_name(name: object, where: str = "dataset") -> str:
    """``name`` if it is a dataset name, else a StageError saying what one is."""
    if problem := _name_problem(name):
        raise StageError(f"{where}: {name!r:.80} is not a dataset name ({problem})")
    return name


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes for one dataset; dvc.yaml declares the same paths."""

    dataset: str

    def __post_init__(self) -> None:
        dataset_name(self.dataset)

    @property
    def raw(self) -> Path:
        return Path("data/raw") / self.dataset

    @property
    def prepared(self) -> Path:
        return Path("data/prepared") / self.dataset

    @property
    def model(self) -> Path:
        return Path("data/models") / self.dataset / "model.pt"

    @property
    def metrics(self) -> Path:  # small files, tracked by git
        return Path("metrics") / self.dataset

    @property
    def evaluation(self) -> Path:
        return self.metrics / "evaluation.json"


def plain(doc: str | None) -> str:
    """A module docstring's first paragraph as plain text, for --help."""
    return " ".join((doc or "").strip().split("\n\n")[0].split()).replace("``", "")


def _parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=plain(doc))
    parser.add_argument("dataset", help="a dataset section of params.yaml, e.g. mnist")
    return parser


def answer_help(module: str, doc: str | None) -> None:
    """Answer ``--help`` and exit, called before a stage's imports load torch (seconds): help in a blink."""
    if module == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
        spec = sys.modules["__main__"].__spec__  # None when run as a file path, not with -m
        _parser(spec.name if spec else f"pipeline.{Path(sys.argv[0]).stem}", doc).parse_args()


def main(stage: Callable[[str], str], argv: list[str] | None = None) -> int:
    module = sys.modules[stage.__module__]
    # Run as `python -m pipeline.train`, the module is __main__; its spec keeps the real name.
    qualified = getattr(module, "__spec__", None) and module.__spec__.name or stage.__module__
    name = qualified.rsplit(".", 1)[-1]
    args = _parser(qualified, module.__doc__).parse_args(argv)
    try:
        summary = stage(dataset_name(args.dataset))
    except StageError as e:
        print(f"{name} {shown_name(args.dataset)}: error: {e}", file=sys.stderr)
        return 1
    print(summary, flush=True)
    return 0


def run(stage: Callable[[str], str]) -> None:
    sys.exit(main(stage))
