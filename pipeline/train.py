"""Stage 3: train a U-Net on a prepared dataset and save it as ``data/models/<dataset>/model.pt``.

A plain loop, as in torchvision's references (``train_one_epoch``, then ``evaluate`` on the validation
split, unless it is empty): the loader's worker process reads each batch's samples from the prepared shards
and albumentations augments them there, so no split is ever held in memory; validation reads a batch of
same-size images at a time (a large one in tiles); the model sees channels-last float batches. Per-epoch train loss,
val loss, val Dice and the
learning rate go to dvclive, whose directory becomes ``metrics/<dataset>/train`` once the model is written.
The model is chosen by params (``arch``, ``width``), never by the dataset's name; a binary task gets one
output logit, a multiclass one a logit per class.

Every epoch ends with the training's whole state on disk, and a stopped or killed training resumes at the
next epoch, with the same result bit for bit as if it had not stopped (``pipeline/resume.py``). One training
of a dataset runs at a time (a lock per dataset). A training whose loss or weights go non-finite stops with
one line naming ``<dataset>.train.lr``, its state still the last finite epoch's, nothing published. A failing
augmenting worker ends the training at once, in one line naming the batch, below the worker's error.

``processes: N`` trains data-parallel in N processes (``pipeline/distributed.py``): the same global batches,
sample order, augmentations, batch-norm statistics and loss as one process, each rank computing a
contiguous part of every global batch; rank 0 alone prints and writes. ``precision`` chooses the forward's
arithmetic (``pipeline/precision.py``). With one process in float32 on a CPU (the defaults there) training is
what it was before either existed, bit for bit.

On a GPU nothing in a training step waits for the GPU: inputs come from pinned memory with non-blocking
copies, the loss is summed on the device and read once per epoch, validation scores on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

# albumentations checks PyPI for a newer release when imported: a stage must not reach for the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import precision as amp
from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import MODEL_LIMITS, save_checkpoint
from pipeline.confusion import ConfusionMatrix
from pipeline.distributed import (
    PEER_FAILED,
    Group,
    SampleLog,
    injected_failure,
    join,
    launch,
    launched_by_torchrun,
    local_world_size,
    peer_failure,
    shard,
    sum_over_ranks,
    synchronize_batchnorm,
)
from pipeline.inference import OVERLAP, TILE, logits_to_labels, pad_to_multiple, tiles, to_input
from pipeline.models import ARCHITECTURES, build_model, count_parameters
from pipeline.params import ParamError, load_params, require
from pipeline.prepared import (
    DatasetMeta,
    PreparedDataError,
    PreparedSplit,
    Sample,
    dataset_digest,
    load_meta,
    open_splits,
)
from pipeline.resume import (
    ResumeKey,
    Stopped,
    StopSignals,
    Training,
    load_state,
    read_state,
    restore,
    save_state,
    state_dir,
    training_lock,
)
from pipeline.runtime import available_memory, describe, peak_rss_mib, release_free_memory, setup, usable_cores
from pipeline.stage import DatasetPaths, StageError, run

INTERPOLATION = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# No OpenCV thread pool: each warp is of one small image, the cores belong to torch, and a pool that exists
# when the augmenting worker is forked is broken in the worker (reconfiguring it there was seen to hang).
cv2.setNumThreads(1)
IGNORE = 255  # target value of pixels outside the field of view: they add nothing to the loss
# Set by a launcher that holds the dataset's training lock for the ranks it starts (see holds_the_lock).
LOCKED_ENV = "SEGPIPE_TRAIN_LOCK_PID"


# ------------------------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class AffineParams:
    """albumentations ``Affine``; the defaults are the tutorial's."""

    p: float = 1.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_px: int = 2
    rotate: float = 10.0
    shear: float = 15.0
    # How the image is resampled ("linear", albumentations' default, or "nearest"); masks always use nearest.
    # Where the mask is a pointwise function of the image (MNIST's threshold), nearest keeps the warped
    # image and mask consistent, while linear blurs edge pixels across the threshold under unchanged labels.
    interpolation: str = "linear"

    def validate(self, key: str) -> None:
        require(0 <= self.p <= 1, f"{key}.p", f"must be in [0, 1], got {self.p}")
        require(
            self.interpolation in ("linear", "nearest"),
            f"{key}.interpolation",
            f"must be 'linear' or 'nearest', got {self.interpolation!r}",
        )
        require(
            len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1],
            f"{key}.scale",
            f"must be [low, high] with 0 < low <= high, got {list(self.scale)}",
        )
        for name in ("translate_px", "rotate", "shear"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class AugmentParams:
    affine: AffineParams | None = None  # None: no geometric warp
    flips: bool = False  # random horizontal and vertical flips
    rotate90: bool = False  # random multiples of 90 degrees
    brightness_contrast: float = 0.0  # max relative change of brightness and of contrast; 0 disables
    gamma: float = 0.0  # max relative change of gamma; 0 disables

    def validate(self, key: str) -> None:
        for name in ("brightness_contrast", "gamma"):
            value = getattr(self, name)
            require(0 <= value < 1, f"{key}.{name}", f"must be in [0, 1), got {value}")


LOSSES = ("cross_entropy", "bce", "dice", "bce_dice")
PATCH_SAMPLING = ("uniform", "foreground")
SCHEDULES = ("constant", "onecycle")
# Threads beyond the cores only wait on each other (128 threads on 2 cores: 10x slower steps, 10000: no epoch
# in 180 s); a few per core are allowed so that a run can be reproduced, bit for bit, on a smaller machine.
THREADS_PER_CORE = 4
# A world size, all nodes together: a run of one's own torchrun may exceed this machine's cores.
MAX_PROCESSES = 1024


@dataclass(frozen=True)
class TrainParams:
    arch: str
    width: int
    epochs: int
    batch_size: int
    lr: float
    loss: str = "cross_entropy"
    schedule: str = "constant"  # "onecycle": warm-up then cosine decay to lr/1e4, stepped every batch
    weight_decay: float = 0.0
    patch_size: int | None = None  # None: whole images; else random square crops of this size
    # Where patches are cut: "uniform" anywhere in the image; "foreground" around a pixel drawn uniformly
    # from the foreground (any class but 0, inside the field of view), so no step is spent on patches
    # outside it or of background alone (albumentations' CropNonEmptyMaskIfExists).
    patch_sampling: str = "uniform"
    # None: one pass over the training images, or with patch_size, enough patches to cover each one's scored
    # area once (epoch_samples), so that an epoch is not one patch per image
    samples_per_epoch: int | None = None
    augment: AugmentParams = field(default_factory=AugmentParams)
    val_batch_size: int = 256  # images per forward pass when scoring the validation split after each epoch
    seed: int = 0
    # torch's intra-op threads per process; None: the usable cores shared out among this machine's processes.
    # Part of the arithmetic: 1 and 2 threads give different weights (pipeline/runtime.py).
    threads: int | None = None
    # Data-parallel processes (pipeline/distributed.py); batch_size is the global batch, batch_size / processes
    # per process. Under a torchrun of one's own (several nodes), the world size it starts.
    processes: int = 1
    precision: str = "auto"  # auto, fp32, bf16 or fp16: the forward's arithmetic (pipeline/precision.py)

    def validate(self, key: str) -> None:
        require(self.arch in ARCHITECTURES, f"{key}.arch", f"must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")
        require(
            self.width <= MODEL_LIMITS["width"],
            f"{key}.width",
            f"must be in [1, {MODEL_LIMITS['width']}] (the widest network a checkpoint may hold), got {self.width}",
        )
        require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.loss in LOSSES, f"{key}.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        require(
            self.schedule in SCHEDULES, f"{key}.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}"
        )
        multiple = ARCHITECTURES[self.arch].size_multiple
        require(
            self.patch_size is None or (self.patch_size > 0 and self.patch_size % multiple == 0),
            f"{key}.patch_size",
            f"must be a positive multiple of {multiple} ({self.arch}'s input size multiple) "
            f"or null, got {self.patch_size}",
        )
        require(
            self.patch_sampling in PATCH_SAMPLING,
            f"{key}.patch_sampling",
            f"must be one of {list(PATCH_SAMPLING)}, got {self.patch_sampling!r}",
        )
        require(self.val_batch_size >= 1, f"{key}.val_batch_size", f"must be >= 1, got {self.val_batch_size}")
        require(0 <= self.seed < 2**32, f"{key}.seed", f"must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        require(
            self.samples_per_epoch is None or self.samples_per_epoch >= 1,
            f"{key}.samples_per_epoch",
            f"must be >= 1 or null, got {self.samples_per_epoch}",
        )
        require(
            self.threads is None or self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}"
        )
        if self.threads is not None:
            cores = usable_cores()
            require(
                self.threads <= THREADS_PER_CORE * cores,
                f"{key}.threads",
                f"must be at most {THREADS_PER_CORE * cores} ({THREADS_PER_CORE} per usable core, {cores} here: "
                f"more threads than that wait on each other) or null, got {self.threads}",
            )
        require(self.processes >= 1, f"{key}.processes", f"must be >= 1, got {self.processes}")
        require(
            self.processes <= MAX_PROCESSES,
            f"{key}.processes",
            f"must be at most {MAX_PROCESSES} (the world size, all nodes together), got {self.processes}",
        )
        require(
            self.batch_size % self.processes == 0,
            f"{key}.batch_size",
            f"must be a multiple of processes ({self.processes}): it is the global batch, split evenly among "
            f"them, got {self.batch_size}",
        )
        require(
            self.precision in amp.PRECISIONS,
            f"{key}.precision",
            f"must be one of {list(amp.PRECISIONS)}, got {self.precision!r}",
        )

    def check_launch(self, key: str) -> None:
        """Before launching ``processes`` workers on this machine: one GPU each, or a few per usable core."""
        if torch.cuda.is_available():
            limit, why = torch.cuda.device_count(), f"one per GPU, {torch.cuda.device_count()} here"
        else:
            limit, why = THREADS_PER_CORE * usable_cores(), f"{THREADS_PER_CORE} per usable core, {usable_cores()} here"
        require(
            self.processes <= limit,
            f"{key}.processes",
            f"must be at most {limit} to run on this machine ({why}), got {self.processes}",
        )


# ------------------------------------------------------------------------------------------ data


def build_augmentation(
    aug: AugmentParams, patch_size: int | None, seed: int, fill_mask: int, patch_sampling: str = "uniform"
) -> A.Compose:
    """``fill_mask`` labels pixels that a crop or warp brings in from outside the image."""
    transforms: list[A.BasicTransform] = []
    if patch_size is not None and patch_sampling == "foreground":
        # Padded first: the crop refuses an image smaller than itself. IGNORE marks pixels outside the field of
        # view, never a foreground to crop around.
        transforms += [
            A.PadIfNeeded(patch_size, patch_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=fill_mask, p=1.0),
            A.CropNonEmptyMaskIfExists(patch_size, patch_size, ignore_values=[IGNORE], p=1.0),
        ]
    elif patch_size is not None:
        transforms.append(A.RandomCrop(patch_size, patch_size, pad_if_needed=True, fill_mask=fill_mask, p=1.0))
    if aug.flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if aug.rotate90:
        transforms.append(A.RandomRotate90(p=0.5))
    if aug.affine is not None:
        a = aug.affine
        # albumentations 2.x ignores always_apply: the probability must be given as p.
        transforms.append(
            A.Affine(
                scale=tuple(a.scale),
                translate_px=(-a.translate_px, a.translate_px),
                rotate=(-a.rotate, a.rotate),
                shear=(-a.shear, a.shear),
                interpolation=INTERPOLATION[a.interpolation],
                fill_mask=fill_mask,
                p=a.p,
            )
        )
    if aug.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(aug.brightness_contrast, aug.brightness_contrast, p=0.5))
    if aug.gamma > 0:
        transforms.append(A.RandomGamma((100 * (1 - aug.gamma), 100 * (1 + aug.gamma)), p=0.5))
    return A.Compose(transforms, seed=seed)


KEEP_SPLIT_BYTES = 64 * 2**20  # a training split whose images and targets fit in this is read once an epoch


def training_target(sample: Sample) -> np.ndarray:
    """The mask with pixels outside the field of view set to IGNORE."""
    if sample.fov is None:
        return sample.mask
    return np.where(sample.fov, sample.mask, np.uint8(IGNORE))


class AugmentedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch: the samples ``order[i * batch_size:][:batch_size]``, each augmented; with
    ``world`` processes, rank ``rank``'s contiguous part of it (``pipeline.distributed.shard``).

    Every batch reseeds the augmentation from (seed, epoch, batch index), so the result does not depend
    on which process augments it or in what order. A rank augments the samples of the batch before its own
    part too, and drops them: the augmentation draws its random numbers sample after sample, so each sample
    gets the very warp that one process gives it, whichever rank takes it. The price is augmenting up to a
    whole batch on the last rank (for 2 processes, 1.5x the augmentation of one; it runs in the loader's
    worker, beside the training).
    """

    def __init__(
        self,
        split: PreparedSplit,
        order: np.ndarray,
        batch_size: int,
        augment: A.Compose,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
    ):
        self.split, self.order, self.batch_size = split, order, batch_size
        self.augment, self.seed, self.epoch = augment, seed, epoch
        self.rank, self.world = rank, world
        # A small split is read once an epoch, not once a patch (STARE's 1,600 patches of 10 images read 2 MB
        # from the shards each); a large one is read sample by sample, so memory never holds it.
        self.keep = sum(h * w * (split.channels + 1) for h, w in split.sizes) <= KEEP_SPLIT_BYTES
        self._kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def global_batch(self, i: int) -> np.ndarray:
        """The indices of batch ``i``'s samples, all ranks' parts in rank order."""
        return self.order[i * self.batch_size : (i + 1) * self.batch_size]

    def indices(self, i: int) -> np.ndarray:
        """The indices of this rank's samples of batch ``i``."""
        index = self.global_batch(i)
        return index[shard(len(index), self.rank, self.world)]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.global_batch(i)
        part = shard(len(index), self.rank, self.world)
        self.augment.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
        try:
            samples = [self._augmented(j) for j in index[: part.stop]][part.start :]
        except PreparedDataError as e:  # a damaged shard: said in one line by the training process, not a traceback
            return {PreparedDataError.__name__: str(e)}
        return np.stack([s["image"] for s in samples]), np.stack([s["mask"] for s in samples])

    def _augmented(self, j: int) -> dict:
        # Read from the shards here, in the loader's worker: only the samples of a batch (or a small split) are
        # ever in memory.
        pair = self._kept.get(int(j))
        if pair is None:
            sample = self.split.read(int(j), ("image", "mask", "fov"))
            pair = sample.image, training_target(sample)
            if self.keep:
                for array in pair:
                    array.setflags(write=False)  # kept for the next patch: an augmentation must not write into it
                self._kept[int(j)] = pair
        return self.augment(image=pair[0], mask=pair[1])


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(worker_id: int) -> None:
    """The augmenting worker leaves SIGINT and SIGTERM to the training process, which stops it when it stops.

    torchrun's agent signals a worker's whole process group: an augmenting worker that died of the signal
    would make the DataLoader raise in the training process before that could stop cleanly. The worker still
    ends when the loader is closed (:meth:`_StopSignalSafeLoader.close`), or with its parent (the DataLoader's
    watchdog). It starts with both signals blocked
    (:class:`_StopSignalSafeLoader`); ignoring them discards any that arrived since, and only then are they
    unblocked.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class WorkerFailed(Exception):
    """The augmenting worker raised, or died, at this epoch's ``step`` (0-based); torch's report of it, with
    the worker's traceback, has been printed."""

    def __init__(self, step: int):
        super().__init__(f"the augmenting worker failed at step {step}")
        self.step = step


class _StopSignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker is started with SIGINT and SIGTERM blocked, and ended when the loader is.

    Without the block, a signal sent to the process group while the worker starts -- after torch's worker loop
    has installed its own SIGTERM handler, which dies of any SIGTERM not from the parent, and before
    ``worker_init_fn`` runs -- kills the worker (seen under load in tests/test_distributed.py). The worker
    inherits the blocked mask; this process unblocks at once, and a signal that arrived meanwhile is delivered
    to it then.

    Used as a context manager, it ends its worker on leaving the block, whatever the error, here or in the
    worker (:meth:`close`). An error the worker raises is :class:`WorkerFailed`.
    """

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._live = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return self._batches(self._live)

    @staticmethod
    def _batches(iterator):
        # Only the worker's batches come out of next(): an error raised here is the worker's.
        step = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as e:
                print(e, file=sys.stderr, flush=True)  # torch's report: the worker's traceback
                raise WorkerFailed(step) from None
            if isinstance(batch, dict):  # AugmentedBatches found the prepared data damaged
                raise PreparedDataError(batch[PreparedDataError.__name__])
            yield batch
            step += 1

    def __enter__(self) -> _StopSignalSafeLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End the worker now. After an error it would otherwise outlive the iterator (held by the
        traceback), ignoring SIGTERM, and the interpreter's exit would wait for it for ever: torch's shutdown
        asks it to stop, and one still busy a few seconds later is killed (it holds nothing to save)."""
        iterator, self._live = getattr(self, "_live", None), None
        if iterator is None:
            return
        try:
            iterator._shutdown_workers()
        finally:  # even if a second stop signal cut it short
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join()


def augmenting_loader(batches: AugmentedBatches, device: torch.device) -> _StopSignalSafeLoader:
    """(images uint8 NHWC, targets uint8 NHW) tensors, augmented one to two batches ahead.

    In a separate process, not a thread: albumentations spends most of its time in Python, and a thread
    holding the GIL stalls the training thread between ops while both intra-op threads wait (measured: a
    width-64 step ran ~15 % slower with the augmenting thread than without it). Use it in a ``with`` block,
    which ends the worker (:class:`_StopSignalSafeLoader`).
    """
    return _StopSignalSafeLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=1,
        prefetch_factor=2,
        pin_memory=device.type == "cuda",
        worker_init_fn=_ignore_stop_signals,
    )


# ------------------------------------------------------------------------------------------ loop


def loss_fn(logits: torch.Tensor, target: torch.Tensor, loss: str, group: Group | None = None) -> torch.Tensor:
    """Mean loss over the pixels whose target is not IGNORE; with a ``group``, over the global batch."""
    if group is not None:
        return _global_loss(logits, target, loss)
    if logits.shape[1] > 1:
        return F.cross_entropy(logits, target.long(), ignore_index=IGNORE)
    valid = (target != IGNORE).float()
    positive = (target == 1).float()
    logit = logits[:, 0]
    terms = []
    if loss in ("bce", "bce_dice"):
        bce = F.binary_cross_entropy_with_logits(logit, positive, reduction="none")
        terms.append((bce * valid).sum() / valid.sum().clamp_min(1))
    if loss in ("dice", "bce_dice"):
        prob = torch.sigmoid(logit) * valid
        terms.append(1 - (2 * (prob * positive).sum() + 1) / (prob.sum() + (positive * valid).sum() + 1))
    return sum(terms)


def _global_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """loss_fn over the global batch, from sums all-reduced across the ranks, the same value on every rank.

    The all-reduce is differentiable (its backward all-reduces the gradient), so each rank's gradient is
    ``world`` times its part of the global loss's gradient, and DistributedDataParallel's average of them is
    exactly that gradient: a mean over the valid pixels of the global batch (not a mean of per-rank means,
    which differ where ranks have different numbers of valid pixels), and a Dice over the global batch.
    """
    return loss_from_sums(sum_over_ranks(loss_sums(logits, target, loss)), loss)


def loss_sums(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The sums loss_fn is made of, which add up over parts of a batch (ranks, tiles): the cross-entropy and
    the valid pixels; for a binary model the BCE, the valid pixels, and Dice's intersection and two sums."""
    valid = target != IGNORE
    if logits.shape[1] > 1:
        total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="sum")
        return torch.stack([total, valid.sum().to(total.dtype)])
    valid = valid.float()
    positive = (target == 1).float()
    logit = logits[:, 0]
    bce = (F.binary_cross_entropy_with_logits(logit, positive, reduction="none") * valid).sum()
    prob = torch.sigmoid(logit) * valid
    return torch.stack([bce, valid.sum(), (prob * positive).sum(), prob.sum(), (positive * valid).sum()])


def loss_from_sums(sums: torch.Tensor, loss: str) -> torch.Tensor:
    if len(sums) == 2:
        return sums[0] / sums[1]
    terms = []
    if loss in ("bce", "bce_dice"):
        terms.append(sums[0] / sums[1].clamp_min(1))
    if loss in ("dice", "bce_dice"):
        terms.append(1 - (2 * sums[2] + 1) / (sums[3] + sums[4] + 1))
    return sum(terms)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """The n x n confusion matrix (flat) of the valid pixels of a batch."""
    valid = target != IGNORE
    return torch.bincount(target[valid].long() * n + logits_to_labels(logits)[valid].long(), minlength=n * n)


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    loss: str,
    device: torch.device,
    progress: str,
    step_sizes: list[int] | None = None,
    precision: str = "fp32",
    scaler=None,
    group: Group | None = None,
    before_step=None,
) -> float:
    """One pass over ``loader``'s batches; returns the mean training loss per image.

    ``step_sizes``: the global batch's size at each step (several processes: this rank's batches are parts
    of them); by default each batch's own. The loss is summed on the device and read once, at the end.
    """
    model.train()
    running = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    quiet = None if group is None or group.main else True
    batches = tqdm(loader, total=len(loader), desc=progress, disable=quiet, mininterval=5, leave=False)
    for step, (images, targets) in enumerate(batches):
        if before_step is not None:
            before_step(step)
        target = targets.to(device, non_blocking=True)
        with amp.autocast(precision, device):
            logits = model(to_input(images, device))
        batch_loss = loss_fn(logits.float(), target, loss, group)  # .float(): none in fp32, where it is one already
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
        size = len(images) if step_sizes is None else step_sizes[step]
        running += batch_loss.detach().double() * size  # the float64 sum a Python float would give
        seen += size
    return running.item() / seen


@torch.inference_mode()
def evaluate(
    model,
    split: PreparedSplit,
    meta: DatasetMeta,
    loss: str,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    group: Group | None = None,
) -> tuple[float, float]:
    """Loss and foreground Dice over a whole split (pixels outside the FOV excluded).

    Read a batch at a time (:meth:`PreparedSplit.runs`: consecutive images of one size), padded to the model's
    multiple and cropped back as pipeline.inference.predict_batches does, and scored on the device: the loss
    summed in float64, the confusion counts by one bincount per batch, read once at the end. With a ``group``,
    each rank scores a contiguous run of the batches, and the sums are all-reduced.
    """
    n = meta.num_classes
    counts = torch.zeros(n * n, dtype=torch.int64, device=device)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    batches = split.runs(batch_size)
    if group is not None:
        batches = batches[shard(len(batches), group.rank, group.world)]
    model.eval()
    for batch_indices in batches:
        samples = split.read_many(batch_indices, ("image", "mask", "fov"))
        images = torch.from_numpy(np.stack([sample.image for sample in samples]))
        if device.type == "cuda":
            images = images.pin_memory()  # an asynchronous copy
        target = torch.from_numpy(np.stack([training_target(sample) for sample in samples])).to(device)
        if max(images.shape[1:3]) > TILE:
            # A large image in overlapping tiles, as evaluate predicts it, and scored tile by tile: the loss's
            # sums add up, and memory holds a tile's logits, never a whole image's.
            sums = 0
            for image, image_target in zip(images, target):
                with amp.autocast(precision, device):
                    for rows, cols, logits in tiles(model, image.numpy(), device, tile=TILE, overlap=OVERLAP):
                        part, logits = image_target[None, rows, cols], logits.float()
                        sums = sums + loss_sums(logits, part, loss)
                        counts += confusion_counts(logits, part, n)
                del logits, part
                release_free_memory()  # image by image: what a large image's tiles left must not pile up
            total_loss += loss_from_sums(sums, loss).double() * len(target)
        else:
            with amp.autocast(precision, device):
                batch, (h, w) = pad_to_multiple(to_input(images, device), model.size_multiple)
                logits = model(batch)[..., :h, :w]
            logits = logits.float()
            total_loss += loss_fn(logits, target, loss).double() * len(target)
            counts += confusion_counts(logits, target, n)
        seen += len(target)
    total_images = torch.tensor(float(seen), dtype=torch.float64, device=device)
    if group is not None:
        summed = group.all_reduce(torch.stack([total_loss, total_images]))
        total_loss, total_images = summed[0], summed[1]
        group.all_reduce(counts)
    confusion = ConfusionMatrix(n)
    confusion.matrix += counts.cpu().reshape(n, n)
    return total_loss.item() / int(total_images.item()), confusion.summary(meta.classes)["dice"] or 0.0


def epoch_samples(settings: TrainParams, split: PreparedSplit) -> int:
    """Samples per epoch: ``samples_per_epoch`` if given; else, for patches, the number that covers each training
    image once -- per image, its area over a patch's, rounded up, the area being the bounding box of its field
    of view where there is one (what lies outside is never scored); else one per image."""
    if settings.samples_per_epoch is not None:
        return settings.samples_per_epoch
    if settings.patch_size is None:
        return len(split)
    if not split.has_fov:
        areas = [h * w for h, w in split.sizes]
    else:
        areas = []
        for _, samples in split.batches(256, ("fov",)):
            for sample in samples:
                rows, cols = np.flatnonzero(sample.fov.any(axis=1)), np.flatnonzero(sample.fov.any(axis=0))
                areas.append(int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) if len(rows) else 0)
    return sum(max(1, -(-area // settings.patch_size**2)) for area in areas)


def activation_bytes(config: dict, height: int, width: int) -> int:
    """Bytes of the activations one image of ``height`` x ``width`` leaves for the backward pass: the output of
    every layer in a forward pass on the meta device, where nothing is allocated."""
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        total += output.numel() * output.element_size() if isinstance(output, torch.Tensor) else 0

    with torch.device("meta"):
        model = build_model(config).eval()  # the same outputs; training batch norm refuses one value per channel
        for module in model.modules():
            if not any(module.children()):
                module.register_forward_hook(count)
        model(torch.empty(1, config["in_channels"], height, width))
    return total


def check_memory(settings: TrainParams, meta: DatasetMeta, split: PreparedSplit, key: str) -> None:
    """Refuse a batch whose activations alone exceed the memory available now (a GPU's per process): it could
    only fail, or draw the kernel's OOM killer onto the machine. The estimate is a lower bound of what a step
    needs, so nothing that fits is refused."""
    available = available_memory()
    if available is None:
        return
    multiple = ARCHITECTURES[settings.arch].size_multiple
    height, width = (
        (settings.patch_size,) * 2
        if settings.patch_size
        else [-(-side // multiple) * multiple for side in split.largest]
    )
    config = {
        "arch": settings.arch,
        "in_channels": split.channels,
        "out_channels": meta.model_outputs,
        "width": settings.width,
    }
    per_image = activation_bytes(config, height, width)
    share = settings.processes if torch.cuda.is_available() else 1  # a GPU each, or the processes share the memory
    images = min(settings.batch_size, epoch_samples(settings, split)) // share  # a batch holds at most an epoch
    if per_image * images > available:
        raise ParamError(
            f"{key}.batch_size: {images} images of {height}x{width} per step need at least "
            f"{per_image * images / 2**20:,.1f} MiB of activations ({per_image / 2**20:,.2f} MiB each), "
            f"more than the {available / 2**20:,.1f} MiB available here: at most "
            f"{max(1, available // per_image) * share}"
        )


def check_fits(settings: TrainParams, meta: DatasetMeta, split: PreparedSplit, key: str) -> None:
    """Refuse, naming the key, a loss that does not fit the task, images the network cannot take whole, patches
    larger than the images, or an epoch whose last batch has fewer samples than there are processes to share it."""
    if meta.task == "binary" and settings.loss == "cross_entropy":
        raise ParamError(f"{key}.loss: a binary task needs bce, dice or bce_dice")
    if meta.task == "multiclass" and settings.loss != "cross_entropy":
        raise ParamError(f"{key}.loss: a multiclass task needs cross_entropy")
    multiple = ARCHITECTURES[settings.arch].size_multiple
    height, width = split.largest
    if settings.patch_size is None and not split.uniform:
        raise ParamError(
            f"{key}.patch_size: the training images have {len(set(split.sizes))} sizes and a batch "
            f"stacks images of one size; train on patches (patch_size) instead of whole images"
        )
    if settings.patch_size is None and (height % multiple or width % multiple):
        raise ParamError(
            f"{key}.patch_size: the images are {height}x{width} and {settings.arch} takes sides that "
            f"are multiples of {multiple}; train on patches (patch_size) instead of whole images"
        )
    # A patch larger than every image is mostly padding, and an absurd one pads each sample to gigabytes.
    largest = -(-max(height, width) // multiple) * multiple
    if settings.patch_size is not None and settings.patch_size > largest:
        raise ParamError(
            f"{key}.patch_size: {settings.patch_size} is larger than the training images ({height}x{width}); "
            f"at most {largest}"
        )
    check_memory(settings, meta, split, key)
    last = epoch_samples(settings, split) % settings.batch_size
    if 0 < last < settings.processes:
        raise ParamError(
            f"{key}.processes: an epoch's last batch has {last} samples, fewer than the {settings.processes} "
            f"processes that share each batch; change batch_size or samples_per_epoch"
        )


HOLD_ENV = "SEGPIPE_TEST_HOLD_S"  # a test hook, read only here


def hold_for_a_stop(signals: StopSignals) -> None:
    """After each epoch, wait up to ``$SEGPIPE_TEST_HOLD_S`` seconds for a stop signal (default none): a test
    that stops the training when it reads an epoch's line would otherwise race the next epochs, and on a loaded
    machine a tiny training can end before the signal lands (tests/test_resume.py, tests/test_distributed.py)."""
    deadline = time.monotonic() + float(os.environ.get(HOLD_ENV, "0"))
    while signals.pending is None and time.monotonic() < deadline:
        time.sleep(0.01)


def log_epoch(live, row: dict) -> None:
    for name, value in row.items():
        live.log_metric(name, value)
    live.next_step()


def last_epoch_summary(last_epoch: dict, runtime: dict) -> dict:
    """The training metrics DVC shows: the last epoch's losses and Dice (no validation scores where the
    validation split is empty), and what ran it, in one short string.

    `dvc metrics show` puts every metrics file's keys in one table, so this stays to four columns; the
    learning rate and the step are in the curves, the runtime in full in the resume key. The runtime reads
    "<device> <CPU ISA> <precision> <processes>x<threads per process> torch <version>", e.g.
    "cpu avx2 fp32 1x2 torch 2.14.1".
    """
    torch_version = runtime["torch"].split("+")[0]
    return {
        "train_loss": last_epoch["train_loss"],
        **{name: last_epoch[name] for name in ("val_loss", "val_dice") if name in last_epoch},
        "runtime": f"{runtime['device']} {runtime['cpu_isa']} {runtime['precision']} "
        f"{runtime['processes']}x{runtime['threads']} torch {torch_version}",
    }


def diverged(section: str, lr: float, what: str) -> ParamError:
    return ParamError(f"{section}.lr: the training diverged: {what}; lower the learning rate (it is {lr:g})")


def holds_the_lock() -> bool:
    """Whether this process takes the dataset's training lock (pipeline.resume.training_lock): a standalone
    training or its launcher, whose ranks do not take it again; under a torchrun of one's own, rank 0, the
    one that writes the state."""
    if not launched_by_torchrun():
        return True
    return os.environ.get(LOCKED_ENV) is None and os.environ.get("RANK", "0") == "0"


def train(dataset: str) -> str:
    settings = load_params(dataset, "train", TrainParams)
    with training_lock(dataset) if holds_the_lock() else contextlib.nullcontext():
        return _train_locked(dataset, settings)


def _train_locked(dataset: str, settings: TrainParams) -> str:
    section = f"{dataset}.train"
    paths = DatasetPaths(dataset)
    meta = load_meta(paths.prepared)
    splits = open_splits(paths.prepared, ("train", "val"))
    train_split, val_split = splits["train"], splits["val"]
    check_fits(settings, meta, train_split, section)
    if settings.processes > 1 and not launched_by_torchrun():
        # A mistake every rank would make is reported once, here, before N processes start.
        settings.check_launch(section)
        amp.resolve(
            settings.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"), f"{section}.precision"
        )
        os.environ[LOCKED_ENV] = str(os.getpid())  # read by the ranks, which inherit this environment
        try:
            return f"train {dataset}: {launch(dataset, settings.processes)}"
        finally:
            del os.environ[LOCKED_ENV]
    world = int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1
    if world != settings.processes:
        raise ParamError(
            f"{section}.processes: is {settings.processes}, but torchrun started {world} processes; set it "
            f"to the world size, so that params.yaml says how the model was trained"
        )
    device = setup(settings.seed, settings.threads or max(1, usable_cores() // local_world_size()))
    group, device = join(device)
    try:
        return _train(dataset, settings, paths, meta, train_split, val_split, device, group)
    except Exception as e:
        if group is None or not peer_failure(e):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(
            f"train {dataset}: rank {group.rank}: stopped, another rank failed or hung ({first_line})",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(PEER_FAILED) from None


def _train(
    dataset: str,
    settings: TrainParams,
    paths: DatasetPaths,
    meta: DatasetMeta,
    train_split: PreparedSplit,
    val_split: PreparedSplit,
    device: torch.device,
    group: Group | None,
) -> str:
    """train() from the point where this process knows its device and its place among the ranks."""
    section = f"{dataset}.train"
    world = group.world if group else 1
    rank = group.rank if group else 0
    main = rank == 0
    precision = amp.resolve(settings.precision, device, f"{section}.precision")
    runtime = {**describe(device), "precision": precision, "processes": world}
    model_config = {
        "arch": settings.arch,
        "in_channels": train_split.channels,
        "out_channels": meta.model_outputs,
        "width": settings.width,
    }
    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    if group is not None:
        model = synchronize_batchnorm(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    samples_per_epoch = epoch_samples(settings, train_split)
    steps_per_epoch = -(-samples_per_epoch // settings.batch_size)
    scheduler = None
    if settings.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=settings.lr, total_steps=settings.epochs * steps_per_epoch
        )
    # Where the data has a field of view, pixels brought in by a warp are outside it; otherwise (MNIST) the
    # black border they bring is plain background.
    fill_mask = IGNORE if train_split.has_fov else 0
    augment = build_augmentation(
        settings.augment, settings.patch_size, settings.seed, fill_mask, settings.patch_sampling
    )
    training = Training(
        model, optimizer, scheduler, np.random.default_rng(settings.seed), device, amp.grad_scaler(precision, device)
    )
    if main:
        processes = f", {world} processes" if world > 1 else ""
        derived = (
            f" (samples_per_epoch null: {settings.patch_size} x {settings.patch_size} patches that cover each "
            f"training image's scored area once)"
            if settings.samples_per_epoch is None and settings.patch_size
            else ""
        )
        print(
            f"train {dataset}: {settings.arch} width {settings.width}, {count_parameters(model):,} parameters, "
            f"{len(train_split)} training images, {samples_per_epoch} samples per epoch{derived}, device {device}, "
            f"{runtime['threads']} threads{processes}, {precision}",
            flush=True,
        )

    resume_dir = state_dir(dataset)
    state_file = resume_dir / "state.pt"
    digest = dataset_digest(paths.prepared)  # its index names every shard's sha256, checked when it was opened
    if group is not None:
        # Several nodes read their own copies: a rank that trained on other data would go unnoticed.
        differing = [r for r, d in enumerate(group.gather(digest)) if d != digest]
        if differing:
            raise StageError(
                f"{paths.prepared}: differs between ranks {rank} and {differing[0]} (sha256 of the "
                f"files); every node must have the same prepared data"
            )
    key = ResumeKey(dataclasses.asdict(settings), digest, runtime)
    if group is None:
        curves = load_state(state_file, key, section, training, settings.epochs)  # one row per epoch done
    else:  # rank 0 reads (and says why it discards a state), every rank restores what it read
        read = read_state(state_file, key, section, training, settings.epochs) if main else None
        curves = restore(group.broadcast(read), training)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    first_epoch = saved_epochs = len(curves)
    if main and first_epoch == settings.epochs:  # stopped after its last epoch, before its outputs were all written
        print(f"all {settings.epochs} epochs are done in {state_file}: writing the outputs", flush=True)
    elif main and first_epoch:
        print(f"resuming at epoch {first_epoch + 1}/{settings.epochs} from {state_file}", flush=True)

    from dvclive import Live  # imported late: it is slow to import and only the training loop needs it

    sample_log = SampleLog(rank)
    start = time.perf_counter()
    try:
        with StopSignals(group.agree if group else None) as signals:
            # The curves grow beside the state; metrics/<dataset>/train changes only when the model is written.
            # Rank 0 alone logs them.
            live_context = (
                Live(str(resume_dir / "curves"), save_dvc_exp=False, dvcyaml=None, report=None)
                if main
                else contextlib.nullcontext()
            )
            with live_context as live:
                for row in curves if main else []:  # the epochs done before an interruption, as they were logged then
                    log_epoch(live, row)
                for epoch in range(first_epoch, settings.epochs):
                    # Sampling with replacement only when an epoch is longer than the split (patch training).
                    # Every rank draws the same global order.
                    order = (
                        training.rng.permutation(len(train_split))[:samples_per_epoch]
                        if samples_per_epoch <= len(train_split)
                        else training.rng.integers(0, len(train_split), samples_per_epoch)
                    )
                    batches = AugmentedBatches(
                        train_split, order, settings.batch_size, augment, settings.seed, epoch, rank, world
                    )
                    lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step; one-cycle changes it every step

                    def before_step(step: int, epoch: int = epoch, batches: AugmentedBatches = batches) -> None:
                        injected_failure(rank)
                        sample_log.record(epoch, step, batches.indices(step))

                    progress = f"epoch {epoch + 1}/{settings.epochs}"
                    try:
                        with augmenting_loader(batches, device) as loader:  # its worker ends with the block
                            train_loss = train_one_epoch(
                                model,
                                signals.between_steps(loader),
                                optimizer,
                                scheduler,
                                settings.loss,
                                device,
                                progress,
                                [len(batches.global_batch(i)) for i in range(len(batches))],
                                precision,
                                training.scaler,
                                group,
                                before_step,
                            )
                    except WorkerFailed as failed:
                        samples = [repr(str(train_split.ids[i])) for i in batches.global_batch(failed.step)]
                        raise StageError(
                            f"{paths.prepared}: augmenting batch {failed.step + 1}/{len(batches)} of "
                            f"{progress} (training samples {', '.join(samples[:3])}"
                            f"{', ...' if len(samples) > 3 else ''}) failed in the loader's worker "
                            f"process (its error is above)"
                        ) from None
                    row = {"train_loss": round(train_loss, 6)}
                    if len(val_split):  # an empty validation split (everything trains) has no curve
                        release_free_memory()  # the steps' buffers, before the validation pass's
                        val_loss, val_dice = evaluate(
                            training.model,
                            val_split,
                            meta,
                            settings.loss,
                            settings.val_batch_size,
                            device,
                            precision,
                            group,
                        )
                        release_free_memory()
                        row.update(val_loss=round(val_loss, 6), val_dice=round(val_dice, 6))
                    # A diverged training stops before its state is saved: the state on disk stays the last
                    # finite epoch's, and nothing is published.
                    for name in ("train_loss", "val_loss"):
                        if name in row and not math.isfinite(row[name]):
                            raise diverged(
                                section, settings.lr, f"its {name.replace('_', ' ')} is {row[name]} in {progress}"
                            )
                    curves.append({**row, "lr": float(f"{lr:.6g}")})
                    with signals.held():  # and then stop, if asked to during the epoch
                        if main:
                            log_epoch(live, curves[-1])
                            save_state(state_file, key, training, curves)
                        saved_epochs = len(curves)
                    if main:
                        scores = "".join(
                            f", {name.replace('_', ' ')} {curves[-1][name]:.4f}"
                            for name in ("val_loss", "val_dice")
                            if name in curves[-1]
                        )
                        print(
                            f"epoch {epoch + 1}/{settings.epochs}: lr {lr:.2e}, train loss {train_loss:.4f}{scores}, "
                            f"{time.perf_counter() - start:.0f} s",
                            flush=True,
                        )
                    hold_for_a_stop(signals)

            # The model first, then the curves: a stage stopped in between has its state still, and reruns
            # only these writes.
            with signals.held():
                if main:
                    state_dict = {k: v.detach().cpu().contiguous() for k, v in training.model.state_dict().items()}
                    if not all(bool(t.isfinite().all()) for t in state_dict.values() if t.is_floating_point()):
                        raise diverged(
                            section,
                            settings.lr,
                            f"its weights are not finite after epoch {settings.epochs}/{settings.epochs}",
                        )
                    save_checkpoint(paths.model, model_config, state_dict, meta)
                    with atomic_path(paths.metrics / "train") as published:
                        shutil.copytree(resume_dir / "curves", published)
                        write_json(published / "metrics.json", last_epoch_summary(curves[-1], runtime))
                    if signals.pending is None:
                        shutil.rmtree(resume_dir)
    except Stopped as stop:
        if main:
            saved = (
                f"the state after epoch {saved_epochs}/{settings.epochs} is in {state_file}: run the stage again "
                f"to resume"
                if saved_epochs
                else "no epoch was complete, nothing to resume"
            )
            print(f"train {dataset}: stopped by {stop}; {saved}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    elapsed = time.perf_counter() - start
    trained = settings.epochs - first_epoch
    if group is not None:
        group.close()
        if not main:
            return f"train {dataset}: rank {rank} of {world} done"
    with_validation = " (with validation)" if len(val_split) else ""
    return (
        f"train {dataset}: {trained} epochs in {elapsed:.0f} s, {trained * samples_per_epoch / elapsed:.0f} images/s"
        f"{with_validation}, peak RSS {peak_rss_mib():.0f} MiB -> {paths.model}"
    )


if __name__ == "__main__":
    run(train)
