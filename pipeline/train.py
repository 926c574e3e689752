"""Stage 3: train a network on a prepared dataset and save it as ``data/models/<dataset>/model.pt``.

With ``processes: N > 1`` it re-launches itself as N processes under torch's elastic launcher; under a torchrun of
one's own it joins that run. docs/training.md tells the whole story.
"""

from __future__ import annotations

from pipeline.stage import answer_help

answer_help(__name__, __doc__)  # before the imports below load torch

import contextlib
import os
from pathlib import Path

import torch

from pipeline import precision as amp
from pipeline.checkpoint import save_checkpoint
from pipeline.curves import publish_curves
from pipeline.distributed import join, launch, launched_by_torchrun, local_world_size, stop_on_peer_failure
from pipeline.engine import Trainer, TrainingData
from pipeline.params import ParamError, load_params
from pipeline.prepared import load_meta, open_splits
from pipeline.resume import training_lock
from pipeline.runtime import default_threads, setup
from pipeline.stage import DatasetPaths, run
from pipeline.train_params import TrainParams, check_fits

# Set by a launcher that holds the dataset's training lock for the ranks it starts.
LOCKED_ENV = "SEGPIPE_TRAIN_LOCK_PID"


class StageTrainer(Trainer):
    def curves_dir(self) -> Path:
        """Live, where dvc.yaml declares them: `dvc plots show` and DVC's VS Code extension follow each epoch."""
        return DatasetPaths(self.name).metrics / "train"

    def run(self) -> str:
        # An earlier model does not go with the curves about to replace its own: without it, a stopped run's
        # outputs are incomplete, and DVC cannot record them as a finished training.
        if self.main:
            DatasetPaths(self.name).model.unlink(missing_ok=True)
        return super().run()

    def write_outputs(self, state_dict: dict, curves_dir, last_epoch: dict) -> None:
        """The checkpoint, then the curves' summary: a stage stopped in between reruns only these writes."""
        paths = DatasetPaths(self.name)
        save_checkpoint(paths.model, self.model_config, state_dict, self.data.meta)
        publish_curves(curves_dir, paths.metrics / "train", last_epoch, self.runtime)


def train(dataset: str) -> str:
    settings = load_params(dataset, "train", TrainParams)
    # A standalone training or launcher takes the lock; under a torchrun of one's own (no LOCKED_ENV), rank 0.
    takes_lock = not launched_by_torchrun() or (LOCKED_ENV not in os.environ and os.environ.get("RANK", "0") == "0")
    with training_lock(dataset) if takes_lock else contextlib.nullcontext():
        return _train_locked(dataset, settings)


def _launch(dataset: str, settings: TrainParams) -> str:
    """Run the training as ``processes`` workers; a mistake every rank would make is reported once, here."""
    section = f"{dataset}.train"
    settings.check_launch(section)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp.resolve(settings.precision, device, f"{section}.precision")
    os.environ[LOCKED_ENV] = str(os.getpid())  # read by the ranks, which inherit this environment
    try:
        return f"train {dataset}: {launch(dataset, settings.processes)}"
    finally:
        del os.environ[LOCKED_ENV]


def _train_locked(dataset: str, settings: TrainParams) -> str:
    paths = DatasetPaths(dataset)
    meta = load_meta(paths.prepared)
    splits = open_splits(paths.prepared, ("train", "val"))
    data = TrainingData(paths.prepared, meta, splits["train"], splits["val"])
    check_fits(settings, data.meta, data.train, f"{dataset}.train")
    if settings.processes > 1 and not launched_by_torchrun():
        return _launch(dataset, settings)
    world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    if world != settings.processes:
        raise ParamError(
            f"{dataset}.train.processes: is {settings.processes}, but torchrun started {world} processes; set "
            f"it to the world size, so that params.yaml says how the model was trained"
        )
    device = setup(settings.seed, settings.threads or default_threads(local_world_size()))
    group, device = join(device)
    with stop_on_peer_failure(group, f"train {dataset}"):
        return StageTrainer(dataset, settings, data, paths.model, device, group).run()


if __name__ == "__main__":
    run(train)
