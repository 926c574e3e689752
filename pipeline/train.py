"""Stage 3: train a U-Net on a prepared dataset and save it as ``data/models/<dataset>/model.pt``.

A plain loop, as in torchvision's references (``train_one_epoch``, then ``evaluate`` on the validation
split): whole uint8 splits stay in memory, albumentations augments each sample in a worker process, the
model sees channels-last float batches. Per-epoch train loss, val loss, val Dice and the learning rate go to
dvclive, whose directory becomes ``metrics/<dataset>/train`` once the model is written. The model is chosen by
params (``arch``, ``width``), never by the dataset's name; a binary task gets one output logit, a multiclass
one a logit per class.

Every epoch ends with the training's whole state on disk, and a stopped or killed training resumes at the
next epoch, with the same result bit for bit as if it had not stopped (``pipeline/resume.py``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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

from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import save_checkpoint
from pipeline.inference import logits_to_labels, predict_batches, to_input
from pipeline.confusion import ConfusionMatrix
from pipeline.models import ARCHITECTURES, build_model, count_parameters
from pipeline.params import ParamError, load_params, require
from pipeline.prepared import DatasetMeta, Split, load_meta, load_split
from pipeline.resume import ResumeKey, StopSignals, Stopped, Training, data_digest, load_state, save_state, state_dir
from pipeline.runtime import describe, peak_rss_mib, setup
from pipeline.stage import DatasetPaths, run

INTERPOLATION = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# No OpenCV thread pool: each warp is of one small image, the cores belong to torch, and a pool that exists
# when the augmenting worker is forked is broken in the worker (reconfiguring it there was seen to hang).
cv2.setNumThreads(1)
IGNORE = 255  # target value of pixels outside the field of view: they add nothing to the loss


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
        require(self.interpolation in ("linear", "nearest"), f"{key}.interpolation",
                f"must be 'linear' or 'nearest', got {self.interpolation!r}")
        require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], f"{key}.scale",
                f"must be [low, high] with 0 < low <= high, got {list(self.scale)}")
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
SCHEDULES = ("constant", "onecycle")


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
    samples_per_epoch: int | None = None  # None: one pass over the training images
    augment: AugmentParams = field(default_factory=AugmentParams)
    val_batch_size: int = 256  # images per forward pass when scoring the validation split after each epoch
    seed: int = 0
    # torch's intra-op threads; None: one per usable core. Part of the arithmetic: 1 and 2 threads give
    # different weights (pipeline/runtime.py).
    threads: int | None = None

    def validate(self, key: str) -> None:
        require(self.arch in ARCHITECTURES, f"{key}.arch", f"must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")
        require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.loss in LOSSES, f"{key}.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        require(self.schedule in SCHEDULES, f"{key}.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        multiple = ARCHITECTURES[self.arch].size_multiple
        require(self.patch_size is None or (self.patch_size > 0 and self.patch_size % multiple == 0),
                f"{key}.patch_size", f"must be a positive multiple of {multiple} ({self.arch}'s input size multiple) "
                f"or null, got {self.patch_size}")
        require(self.val_batch_size >= 1, f"{key}.val_batch_size", f"must be >= 1, got {self.val_batch_size}")
        require(0 <= self.seed < 2**32, f"{key}.seed", f"must be in [0, 2**32) (numpy's seed range), got {self.seed}")
        require(self.samples_per_epoch is None or self.samples_per_epoch >= 1, f"{key}.samples_per_epoch",
                f"must be >= 1 or null, got {self.samples_per_epoch}")
        require(self.threads is None or self.threads >= 1, f"{key}.threads", f"must be >= 1 or null, got {self.threads}")


# ------------------------------------------------------------------------------------------ data


def build_augmentation(aug: AugmentParams, patch_size: int | None, seed: int, fill_mask: int) -> A.Compose:
    """``fill_mask`` labels pixels that a crop or warp brings in from outside the image."""
    transforms: list[A.BasicTransform] = []
    if patch_size is not None:
        transforms.append(A.RandomCrop(patch_size, patch_size, pad_if_needed=True, fill_mask=fill_mask, p=1.0))
    if aug.flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if aug.rotate90:
        transforms.append(A.RandomRotate90(p=0.5))
    if aug.affine is not None:
        a = aug.affine
        # albumentations 2.x ignores always_apply: the probability must be given as p.
        transforms.append(A.Affine(scale=tuple(a.scale), translate_px=(-a.translate_px, a.translate_px),
                                   rotate=(-a.rotate, a.rotate), shear=(-a.shear, a.shear),
                                   interpolation=INTERPOLATION[a.interpolation], fill_mask=fill_mask, p=a.p))
    if aug.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(aug.brightness_contrast, aug.brightness_contrast, p=0.5))
    if aug.gamma > 0:
        transforms.append(A.RandomGamma((100 * (1 - aug.gamma), 100 * (1 + aug.gamma)), p=0.5))
    return A.Compose(transforms, seed=seed)


def training_targets(split: Split) -> np.ndarray:
    """Masks with pixels outside the field of view set to IGNORE."""
    if split.fov is None:
        return split.masks
    return np.where(split.fov, split.masks, np.uint8(IGNORE))


class AugmentedBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch: the samples ``order[i * batch_size:][:batch_size]``, each augmented.

    Every batch reseeds the augmentation from (seed, epoch, batch index), so the result does not depend
    on which process augments it or in what order.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, order: np.ndarray, batch_size: int,
                 augment: A.Compose, seed: int, epoch: int):
        self.images, self.targets, self.order, self.batch_size = images, targets, order, batch_size
        self.augment, self.seed, self.epoch = augment, seed, epoch

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.order[i * self.batch_size : (i + 1) * self.batch_size]
        self.augment.set_random_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
        samples = [self.augment(image=self.images[j], mask=self.targets[j]) for j in index]
        return np.stack([s["image"] for s in samples]), np.stack([s["mask"] for s in samples])


def augmenting_loader(batches: AugmentedBatches, device: torch.device) -> torch.utils.data.DataLoader:
    """(images uint8 NHWC, targets uint8 NHW) tensors, augmented one to two batches ahead.

    In a separate process, not a thread: albumentations spends most of its time in Python, and a thread
    holding the GIL stalls the training thread between ops while both intra-op threads wait (measured: a
    width-64 step ran ~15 % slower with the augmenting thread than without it).
    """
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=1, prefetch_factor=2,
                                       pin_memory=device.type == "cuda")



# ------------------------------------------------------------------------------------------ loop


def loss_fn(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over the pixels whose target is not IGNORE."""
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


def train_one_epoch(model, loader, optimizer, scheduler, loss: str, device: torch.device, progress: str) -> float:
    """One pass over ``loader``'s batches; returns the mean training loss per image."""
    model.train()
    running, seen = 0.0, 0
    for images, targets in tqdm(loader, total=len(loader), desc=progress, disable=None, mininterval=5, leave=False):
        target = targets.to(device, non_blocking=True)
        batch_loss = loss_fn(model(to_input(images, device)), target, loss)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        running += batch_loss.item() * len(images)
        seen += len(images)
    return running / seen


@torch.no_grad()
def evaluate(model, split: Split, targets: np.ndarray, meta: DatasetMeta, loss: str, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """Loss and foreground Dice over a whole split (pixels outside the FOV excluded)."""
    confusion = ConfusionMatrix(meta.num_classes)
    total_loss, total_images = 0.0, 0
    for index, logits in predict_batches(model, split.images, batch_size, device):
        target = torch.from_numpy(targets[index])
        total_loss += loss_fn(logits, target, loss).item() * len(target)
        total_images += len(target)
        confusion.update(target, logits_to_labels(logits), valid_mask=target != IGNORE)
    return total_loss / total_images, confusion.summary(meta.classes)["dice"] or 0.0


def check_fits(settings: TrainParams, meta: DatasetMeta, split: Split, key: str) -> None:
    """Refuse, naming the key, a loss that does not fit the task or images the network cannot take whole."""
    if meta.task == "binary" and settings.loss == "cross_entropy":
        raise ParamError(f"{key}.loss: a binary task needs bce, dice or bce_dice")
    if meta.task == "multiclass" and settings.loss != "cross_entropy":
        raise ParamError(f"{key}.loss: a multiclass task needs cross_entropy")
    multiple = ARCHITECTURES[settings.arch].size_multiple
    height, width = split.images.shape[1:3]
    if settings.patch_size is None and (height % multiple or width % multiple):
        raise ParamError(f"{key}.patch_size: the images are {height}x{width} and {settings.arch} takes sides that "
                         f"are multiples of {multiple}; train on patches (patch_size) instead of whole images")


def log_epoch(live, row: dict) -> None:
    for name, value in row.items():
        live.log_metric(name, value)
    live.next_step()


def last_epoch_summary(last_epoch: dict, runtime: dict) -> dict:
    """The training metrics DVC shows: the last epoch's losses and Dice, and what ran it, in one short string.

    `dvc metrics show` puts every metrics file's keys in one table, so this stays to four columns; the
    learning rate and the step are in the curves, the runtime in full in the resume key.
    """
    torch_version = runtime["torch"].split("+")[0]
    return {"train_loss": last_epoch["train_loss"], "val_loss": last_epoch["val_loss"],
            "val_dice": last_epoch["val_dice"],
            "runtime": f"{runtime['device']} {runtime['cpu_isa']} x{runtime['threads']} torch {torch_version}"}


def train(dataset: str) -> str:
    settings = load_params(dataset, "train", TrainParams)
    paths = DatasetPaths(dataset)
    meta = load_meta(paths.prepared)
    train_split, val_split = load_split(paths.prepared, "train"), load_split(paths.prepared, "val")
    check_fits(settings, meta, train_split, f"{dataset}.train")
    device = setup(settings.seed, settings.threads)
    runtime = describe(device)
    train_targets, val_targets = training_targets(train_split), training_targets(val_split)

    model_config = {"arch": settings.arch, "in_channels": int(train_split.images.shape[-1]),
                    "out_channels": meta.model_outputs, "width": settings.width}
    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    samples_per_epoch = settings.samples_per_epoch or len(train_split)
    steps_per_epoch = -(-samples_per_epoch // settings.batch_size)
    scheduler = None
    if settings.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr,
                                                        total_steps=settings.epochs * steps_per_epoch)
    # Where the data has a field of view, pixels brought in by a warp are outside it; otherwise (MNIST) the
    # black border they bring is plain background.
    fill_mask = IGNORE if train_split.fov is not None else 0
    augment = build_augmentation(settings.augment, settings.patch_size, settings.seed, fill_mask)
    training = Training(model, optimizer, scheduler, np.random.default_rng(settings.seed), device)
    print(f"train {dataset}: {settings.arch} width {settings.width}, {count_parameters(model):,} parameters, "
          f"{len(train_split)} training images, {samples_per_epoch} samples per epoch, device {device}, "
          f"{runtime['threads']} threads")

    resume_dir = state_dir(dataset)
    state_file = resume_dir / "state.pt"
    key = ResumeKey(dataclasses.asdict(settings), data_digest(paths.prepared), runtime)
    curves = load_state(state_file, key, f"{dataset}.train", training, settings.epochs)  # one row per epoch done
    first_epoch = saved_epochs = len(curves)
    if first_epoch == settings.epochs:  # stopped after its last epoch, before its outputs were all written
        print(f"all {settings.epochs} epochs are done in {state_file}: writing the outputs", flush=True)
    elif first_epoch:
        print(f"resuming at epoch {first_epoch + 1}/{settings.epochs} from {state_file}", flush=True)

    from dvclive import Live  # imported late: it is slow to import and only the training loop needs it

    start = time.perf_counter()
    try:
        with StopSignals() as signals:
            # The curves grow beside the state; metrics/<dataset>/train changes only when the model is written.
            with Live(str(resume_dir / "curves"), save_dvc_exp=False, dvcyaml=None, report=None) as live:
                for row in curves:  # the epochs done before an interruption, as they were logged then
                    log_epoch(live, row)
                for epoch in range(first_epoch, settings.epochs):
                    # Sampling with replacement only when an epoch is longer than the split (patch training).
                    order = (training.rng.permutation(len(train_split))[:samples_per_epoch]
                             if samples_per_epoch <= len(train_split)
                             else training.rng.integers(0, len(train_split), samples_per_epoch))
                    batches = AugmentedBatches(train_split.images, train_targets, order, settings.batch_size, augment,
                                               settings.seed, epoch)
                    lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step; one-cycle changes it every step
                    loader = signals.between_steps(augmenting_loader(batches, device))
                    train_loss = train_one_epoch(model, loader, optimizer, scheduler, settings.loss, device,
                                                 f"epoch {epoch + 1}/{settings.epochs}")
                    val_loss, val_dice = evaluate(model, val_split, val_targets, meta, settings.loss,
                                                  settings.val_batch_size, device)
                    curves.append({"train_loss": round(train_loss, 6), "val_loss": round(val_loss, 6),
                                   "val_dice": round(val_dice, 6), "lr": float(f"{lr:.6g}")})
                    log_epoch(live, curves[-1])
                    with signals.held():  # and then stop, if asked to during the epoch
                        save_state(state_file, key, training, curves)
                        saved_epochs = len(curves)
                    print(f"epoch {epoch + 1}/{settings.epochs}: lr {lr:.2e}, train loss {train_loss:.4f}, "
                          f"val loss {val_loss:.4f}, val dice {val_dice:.4f}, {time.perf_counter() - start:.0f} s",
                          flush=True)

            # The model first, then the curves: a stage stopped in between has its state still, and reruns
            # only these writes.
            with signals.held():
                state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_checkpoint(paths.model, model_config, state_dict, meta)
                with atomic_path(paths.metrics / "train") as published:
                    shutil.copytree(resume_dir / "curves", published)
                    write_json(published / "metrics.json", last_epoch_summary(curves[-1], runtime))
                if signals.pending is None:
                    shutil.rmtree(resume_dir)
    except Stopped as stop:
        saved = (f"the state after epoch {saved_epochs}/{settings.epochs} is in {state_file}: run the stage again "
                 f"to resume" if saved_epochs else "no epoch was complete, nothing to resume")
        print(f"train {dataset}: stopped by {stop}; {saved}", file=sys.stderr, flush=True)
        raise SystemExit(128 + stop.signum) from None
    elapsed = time.perf_counter() - start
    trained = settings.epochs - first_epoch
    return (f"train {dataset}: {trained} epochs in {elapsed:.0f} s, {trained * samples_per_epoch / elapsed:.0f} images/s "
            f"(with validation), peak RSS {peak_rss_mib():.0f} MiB -> {paths.model}")


if __name__ == "__main__":
    run(train)
