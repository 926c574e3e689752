"""The training curves, a row per epoch logged with dvclive (live, in ``metrics/<ds>/train``), and the
``metrics.json`` of the last epoch written beside them with the model.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from pipeline.atomic import atomic_path, write_json


def training_curves(directory: Path, enabled: bool) -> contextlib.AbstractContextManager:
    """A dvclive ``Live`` logging to ``directory`` (None where not ``enabled``: only rank 0 logs)."""
    if not enabled:
        return contextlib.nullcontext()
    from dvclive import Live  # imported late: it is slow to import and only the training loop needs it

    return Live(str(directory), save_dvc_exp=False, dvcyaml=None, report=None)


def log_epoch(live, row: dict) -> None:
    for name, value in row.items():
        live.log_metric(name, value)
    live.next_step()


def publish_curves(curves_dir: Path, destination: Path, last_epoch: dict, runtime: dict) -> None:
    """The curves in ``destination`` (a copy, atomic, unless they were logged there) and ``metrics.json``: the last
    epoch's losses and Dice, and what ran it ("<device> <ISA> <precision> <processes>x<threads> torch")."""
    summary = {
        "train_loss": last_epoch["train_loss"],
        **{name: last_epoch[name] for name in ("val_loss", "val_dice") if name in last_epoch},
        "runtime": f"{runtime['device']} {runtime['cpu_isa']} {runtime['precision']} "
        f"{runtime['processes']}x{runtime['threads']} torch {runtime['torch'].split('+')[0]}",
    }
    if curves_dir.resolve() == destination.resolve():
        write_json(destination / "metrics.json", summary)
        return
    with atomic_path(destination) as published:
        shutil.copytree(curves_dir, published)
        write_json(published / "metrics.json", summary)
