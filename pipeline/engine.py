"""The training loop as a small :class:`Trainer`: build, resume, train and validate each epoch, save its state.

To change one part, override a hook: ``build_model``, ``build_loss``, ``build_optimizer``, ``build_scheduler``,
``on_step_start``, ``on_epoch_end``, ``write_outputs``; objects in ``CALLBACKS`` get the two ``on_*`` calls too.
Resuming, several processes and precision: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import precision as amp
from pipeline.augment import build_augmentation
from pipeline.curves import log_epoch, training_curves
from pipeline.distributed import Group, synchronize_batchnorm
from pipeline.inference import to_input
from pipeline.loader import AugmentedBatches, WorkerFailed, augmenting_loader
from pipeline.losses import IGNORE, Loss, build_loss, global_value
from pipeline.models import build_model, count_parameters
from pipeline.params import ParamError
from pipeline.prepared import DatasetMeta, PreparedSplit, dataset_digest
from pipeline.resume import RESUME_ROOT, ResumeKey, Stopped, StopSignals, Training, read_state, restore, save_state
from pipeline.runtime import describe, peak_rss_mib, release_free_memory
from pipeline.stage import StageError
from pipeline.train_params import TrainParams, epoch_samples
from pipeline.validation import validate

# Objects with ``on_step_start(trainer, epoch, step, batches)`` and/or ``on_epoch_end(trainer, epoch)``.
CALLBACKS: list = []


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What a training reads: the prepared dataset at ``path``, its description and two of its splits."""

    path: Path
    meta: DatasetMeta
    train: PreparedSplit
    val: PreparedSplit


def diverged(section: str, lr: float, what: str) -> ParamError:
    return ParamError(f"{section}.lr: the training diverged: {what}; lower the learning rate (it is {lr:g})")


class Trainer:
    """One training of dataset ``name`` under ``settings`` in this process (``group``: its place among several);
    ``output`` names what :meth:`write_outputs` writes, for the summary line."""

    def __init__(self, name: str, settings: TrainParams, data: TrainingData, output: Path, device, group: Group | None):
        self.name, self.section, self.settings, self.data = name, f"{name}.train", settings, data
        self.output, self.device, self.group = output, device, group
        self.rank, self.world = (group.rank, group.world) if group else (0, 1)
        self.main = self.rank == 0
        self.state_dir = RESUME_ROOT / name
        self.state_file = self.state_dir / "state.pt"
        self.signals: StopSignals | None = None

    def build_model(self) -> nn.Module:
        model = build_model(self.model_config).to(self.device).to(memory_format=torch.channels_last)
        return synchronize_batchnorm(model, self.device) if self.group is not None else model

    def build_loss(self) -> Loss:
        return build_loss(self.settings.loss, self.data.meta.task, f"{self.section}.loss")

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        if self.settings.schedule != "onecycle":
            return None
        total_steps = self.settings.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.settings.lr, total_steps=total_steps)

    def on_step_start(self, epoch: int, step: int, batches: AugmentedBatches) -> None:
        for callback in CALLBACKS:
            if hasattr(callback, "on_step_start"):
                callback.on_step_start(self, epoch, step, batches)

    def on_epoch_end(self, epoch: int) -> None:
        for callback in CALLBACKS:
            if hasattr(callback, "on_epoch_end"):
                callback.on_epoch_end(self, epoch)

    def curves_dir(self) -> Path:
        """Where rank 0's dvclive writes the curves, a row per epoch as it is done."""
        return self.state_dir / "curves"

    def write_outputs(self, state_dict: dict, curves_dir: Path, last_epoch: dict) -> None:
        """Publish the trained weights and the curves (rank 0, once every epoch is done)."""
        raise NotImplementedError

    def build(self) -> None:
        """Everything an epoch changes, in the order that draws the same random numbers as ever."""
        s, split = self.settings, self.data.train
        self.precision = amp.resolve(s.precision, self.device, f"{self.section}.precision")
        self.runtime = {**describe(self.device), "precision": self.precision, "processes": self.world}
        self.model_config = s.model_config(split.channels, self.data.meta.model_outputs)
        model = self.build_model()
        optimizer = self.build_optimizer(model)
        self.samples_per_epoch = epoch_samples(s, split)
        scheduler = self.build_scheduler(optimizer, -(-self.samples_per_epoch // s.batch_size))
        # Pixels a warp brings in are outside the field of view; without one (MNIST) they are background.
        fill_mask = IGNORE if split.has_fov else 0
        self.augment = build_augmentation(s.augment, s.patch_size, s.seed, fill_mask, s.patch_sampling)
        self.loss = self.build_loss()
        scaler = amp.grad_scaler(self.precision, self.device)
        self.training = Training(model, optimizer, scheduler, np.random.default_rng(s.seed), self.device, scaler)
        self.model = model  # what trains: wrapped in DistributedDataParallel with several processes

    def _announce(self) -> None:
        s = self.settings
        processes = f", {self.world} processes" if self.world > 1 else ""
        derived = ""
        if s.samples_per_epoch is None and s.patch_size:
            derived = (
                f" (samples_per_epoch null: {s.patch_size} x {s.patch_size} patches that cover each "
                f"training image's scored area once)"
            )
        print(
            f"train {self.name}: {s.arch} width {s.width}, {count_parameters(self.model):,} parameters, "
            f"{len(self.data.train)} training images, {self.samples_per_epoch} samples per epoch{derived}, device "
            f"{self.device}, {self.runtime['threads']} threads{processes}, {self.precision}",
            flush=True,
        )

    def _resume(self) -> list[dict]:
        """The curve rows of the epochs a saved state has done ([] for none), that state restored."""
        digest = dataset_digest(self.data.path)  # its index names every shard's sha256, checked when it was opened
        self.key = ResumeKey(dataclasses.asdict(self.settings), digest, self.runtime)
        if self.group is not None:  # several nodes read their own copies
            differing = [r for r, d in enumerate(self.group.gather(digest)) if d != digest]
            if differing:
                raise StageError(
                    f"{self.data.path}: differs between ranks {self.rank} and {differing[0]} (sha256 of the "
                    f"files); every node must have the same prepared data"
                )
        epochs = self.settings.epochs
        state = read_state(self.state_file, self.key, self.section, self.training, epochs) if self.main else None
        if self.group is None:
            return restore(state, self.training)
        curves = restore(self.group.broadcast(state), self.training)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return curves

    def run(self) -> str:
        """Train every epoch not done yet, then write the outputs; a summary line. SIGINT or SIGTERM stops it
        between two steps (exit status 128 + the signal), its state kept for the next run."""
        self.build()
        if self.main:
            self._announce()
        curves = self._resume()
        self.first_epoch = self.saved_epochs = len(curves)
        epochs = self.settings.epochs
        if self.main and self.first_epoch == epochs:  # stopped after its last epoch, before its outputs were written
            print(f"all {epochs} epochs are done in {self.state_file}: writing the outputs", flush=True)
        elif self.main and self.first_epoch:
            print(f"resuming at epoch {self.first_epoch + 1}/{epochs} from {self.state_file}", flush=True)
        self.start = time.perf_counter()
        try:
            with StopSignals(self.group.agree if self.group else None) as self.signals:
                with training_curves(self.curves_dir(), self.main) as live:
                    for row in curves if self.main else []:  # the epochs done before an interruption
                        log_epoch(live, row)
                    for epoch in range(self.first_epoch, epochs):
                        self._epoch(epoch, curves, live)
                with self.signals.held():
                    if self.main:
                        self._finish(curves)
        except Stopped as stop:
            self._report_stop(stop)
            raise SystemExit(128 + stop.signum) from None
        return self._summary()

    def _epoch(self, epoch: int, curves: list[dict], live) -> None:
        progress = f"epoch {epoch + 1}/{self.settings.epochs}"
        batches = self._epoch_batches(epoch)
        lr = self.training.optimizer.param_groups[0]["lr"]  # at the epoch's first step; one-cycle changes it
        train_loss = self._train_epoch(batches, epoch, progress)
        row = {"train_loss": round(train_loss, 6), **self._validation_row()}
        # A diverged training stops before its state is saved: the state on disk stays the last finite epoch's.
        for name in ("train_loss", "val_loss"):
            if name in row and not math.isfinite(row[name]):
                what = f"its {name.replace('_', ' ')} is {row[name]} in {progress}"
                raise diverged(self.section, self.settings.lr, what)
        curves.append({**row, "lr": float(f"{lr:.6g}")})
        with self.signals.held():  # and then stop, if asked to during the epoch
            if self.main:
                log_epoch(live, curves[-1])
                save_state(self.state_file, self.key, self.training, curves)
            self.saved_epochs = len(curves)
        if self.main:
            names = ("val_loss", "val_dice")
            scores = "".join(f", {name.replace('_', ' ')} {curves[-1][name]:.4f}" for name in names if name in row)
            elapsed = time.perf_counter() - self.start
            print(f"{progress}: lr {lr:.2e}, train loss {train_loss:.4f}{scores}, {elapsed:.0f} s", flush=True)
        self.on_epoch_end(epoch)

    def _validation_row(self) -> dict:
        """The validation loss and Dice; none for an empty validation split (everything trains)."""
        s, data = self.settings, self.data
        if not len(data.val):
            return {}
        release_free_memory()  # the steps' buffers, before the validation pass's
        args = (data.val, data.meta, self.loss, s.val_batch_size, self.device, self.precision, self.group)
        val_loss, val_dice = validate(self.training.model, *args)
        release_free_memory()
        return {"val_loss": round(val_loss, 6), "val_dice": round(val_dice, 6)}

    def _epoch_batches(self, epoch: int) -> AugmentedBatches:
        """The same global sample order on every rank, with replacement only when an epoch is longer than the split."""
        s, split, rng = self.settings, self.data.train, self.training.rng
        if self.samples_per_epoch <= len(split):
            order = rng.permutation(len(split))[: self.samples_per_epoch]
        else:
            order = rng.integers(0, len(split), self.samples_per_epoch)
        return AugmentedBatches(split, order, s.batch_size, self.augment, s.seed, epoch, self.rank, self.world)

    def _train_epoch(self, batches: AugmentedBatches, epoch: int, progress: str) -> float:
        try:
            with augmenting_loader(batches, self.device) as loader:  # its worker ends with the block
                return self.train_one_epoch(self.signals.between_steps(loader), batches, epoch, progress)
        except WorkerFailed as failed:
            samples = [repr(str(self.data.train.ids[i])) for i in batches.global_batch(failed.step)]
            raise StageError(
                f"{self.data.path}: augmenting batch {failed.step + 1}/{len(batches)} of {progress} (training "
                f"samples {', '.join(samples[:3])}{', ...' if len(samples) > 3 else ''}) failed in the loader's "
                f"worker process (its error is above)"
            ) from None

    def train_one_epoch(self, loader, batches: AugmentedBatches, epoch: int, progress: str) -> float:
        """The mean training loss per image of one pass, summed on the device and read once; with several
        processes each batch is part of a global one, whose size counts."""
        self.model.train()
        running = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        quiet = None if self.main else True
        steps = tqdm(loader, total=len(batches), desc=progress, disable=quiet, mininterval=5, leave=False)
        for step, (images, targets) in enumerate(steps):
            self.on_step_start(epoch, step, batches)
            batch_loss = self.train_step(images, targets)
            size = len(batches.global_batch(step))
            running += batch_loss.detach().double() * size  # the float64 sum a Python float would give
            seen += size
        return running.item() / seen

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimiser step on a batch; its loss (of the global batch, with several processes)."""
        optimizer, scaler, scheduler = self.training.optimizer, self.training.scaler, self.training.scheduler
        target = targets.to(self.device, non_blocking=True)
        with amp.autocast(self.precision, self.device):
            logits = self.model(to_input(images, self.device))
        logits = logits.float()  # none in fp32, where it is one already
        batch_loss = self.loss(logits, target) if self.group is None else global_value(self.loss, logits, target)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            batch_loss.backward()
            optimizer.step()
        else:
            scaler.scale(batch_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        return batch_loss

    def _finish(self, curves: list[dict]) -> None:
        state_dict = {k: v.detach().cpu().contiguous() for k, v in self.training.model.state_dict().items()}
        if not all(bool(t.isfinite().all()) for t in state_dict.values() if t.is_floating_point()):
            epochs = self.settings.epochs
            raise diverged(self.section, self.settings.lr, f"its weights are not finite after epoch {epochs}/{epochs}")
        self.write_outputs(state_dict, self.curves_dir(), curves[-1])
        if self.signals.pending is None:
            shutil.rmtree(self.state_dir)

    def _report_stop(self, stop: Stopped) -> None:
        if not self.main:
            return
        epochs, done = self.settings.epochs, self.saved_epochs
        saved = f"the state after epoch {done}/{epochs} is in {self.state_file}: run the stage again to resume"
        if not done:
            saved = "no epoch was complete, nothing to resume"
        print(f"train {self.name}: stopped by {stop}; {saved}", file=sys.stderr, flush=True)

    def _summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        trained = self.settings.epochs - self.first_epoch
        if self.group is not None:
            self.group.close()
            if not self.main:
                return f"train {self.name}: rank {self.rank} of {self.world} done"
        with_validation = " (with validation)" if len(self.data.val) else ""
        return (
            f"train {self.name}: {trained} epochs in {elapsed:.0f} s, {trained * self.samples_per_epoch / elapsed:.0f} "
            f"images/s{with_validation}, peak RSS {peak_rss_mib():.0f} MiB -> {self.output}"
        )
