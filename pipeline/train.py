"""Stage 3: train a U-Net on a prepared dataset and save it as ``data/models/<dataset>/model.pt``.

A plain loop, as in torchvision's references: whole uint8 splits stay in memory, albumentations augments
each sample, the model sees channels-last float batches. Per-epoch train loss, val loss and val Dice go to
dvclive under ``metrics/<dataset>/train``. The model is chosen by params (``arch``, ``width``), never by the
dataset's name; a binary task gets one output logit, a multiclass one a logit per class.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# albumentations checks PyPI for a newer release when imported: a stage must not reach for the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import params as params_module
from pipeline.artifacts import DatasetMeta, DatasetPaths, Split, load_meta, load_split, save_checkpoint
from pipeline.inference import logits_to_labels, predict_batches, to_input
from pipeline.metrics import ConfusionMatrix
from pipeline.models import build_model, count_parameters
from pipeline.params import AugmentParams, TrainParams
from pipeline.runtime import peak_rss_mib, setup

INTERPOLATION = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# No OpenCV thread pool: each warp is of one small image, the cores belong to torch, and a pool that exists
# when the augmenting worker is forked is broken in the worker (reconfiguring it there was seen to hang).
cv2.setNumThreads(1)
IGNORE = 255  # target value of pixels outside the field of view: they add nothing to the loss


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


@torch.no_grad()
def validate(model, split: Split, targets: np.ndarray, meta: DatasetMeta, loss: str, device) -> tuple[float, float]:
    """Loss and foreground Dice over a whole split (pixels outside the FOV excluded)."""
    confusion = ConfusionMatrix(meta.num_classes)
    total_loss, total_images = 0.0, 0
    for index, logits in predict_batches(model, split.images, 256, device):
        target = torch.from_numpy(targets[index])
        total_loss += loss_fn(logits, target, loss).item() * len(target)
        total_images += len(target)
        confusion.update(target, logits_to_labels(logits), valid_mask=target != IGNORE)
    return total_loss / total_images, confusion.summary(meta.classes)["dice"] or 0.0


def train(dataset: str) -> dict:
    params: TrainParams = params_module.load(dataset, "train")
    paths = DatasetPaths(dataset)
    device = setup(params.seed)
    meta = load_meta(paths.prepared)
    train_split, val_split = load_split(paths.prepared, "train"), load_split(paths.prepared, "val")
    train_targets, val_targets = training_targets(train_split), training_targets(val_split)
    if meta.task == "binary" and params.loss == "cross_entropy":
        raise ValueError(f"params.yaml: {dataset}.train.loss: a binary task needs bce, dice or bce_dice")
    if meta.task == "multiclass" and params.loss != "cross_entropy":
        raise ValueError(f"params.yaml: {dataset}.train.loss: a multiclass task needs cross_entropy")

    model_config = {"arch": params.arch, "in_channels": int(train_split.images.shape[-1]),
                    "out_channels": meta.model_outputs, "width": params.width}
    model = build_model(model_config).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    samples_per_epoch = params.samples_per_epoch or len(train_split)
    steps_per_epoch = -(-samples_per_epoch // params.batch_size)
    scheduler = None
    if params.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=params.lr,
                                                        total_steps=params.epochs * steps_per_epoch)
    # Where the data has a field of view, pixels brought in by a warp are outside it; otherwise (MNIST) the
    # black border they bring is plain background.
    fill_mask = IGNORE if train_split.fov is not None else 0
    augment = build_augmentation(params.augment, params.patch_size, params.seed, fill_mask)
    rng = np.random.default_rng(params.seed)
    print(f"train {dataset}: {params.arch} width {params.width}, {count_parameters(model):,} parameters, "
          f"{len(train_split)} training images, {samples_per_epoch} samples per epoch, device {device}")

    from dvclive import Live  # imported late: it is slow to import and only the training loop needs it

    start = time.perf_counter()
    history = {}
    with Live(str(paths.metrics / "train"), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for epoch in range(params.epochs):
            model.train()
            # Sampling with replacement only when an epoch is longer than the split (patch training).
            order = (rng.permutation(len(train_split))[:samples_per_epoch] if samples_per_epoch <= len(train_split)
                     else rng.integers(0, len(train_split), samples_per_epoch))
            running, seen = 0.0, 0
            batches = AugmentedBatches(train_split.images, train_targets, order, params.batch_size, augment,
                                       params.seed, epoch)
            for images, targets in tqdm(augmenting_loader(batches, device), total=steps_per_epoch,
                                        desc=f"epoch {epoch + 1}/{params.epochs}", disable=None, mininterval=5,
                                        leave=False):
                target = targets.to(device, non_blocking=True)
                loss = loss_fn(model(to_input(images, device)), target, params.loss)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                running += loss.item() * len(images)
                seen += len(images)
            val_loss, val_dice = validate(model, val_split, val_targets, meta, params.loss, device)
            history = {"train_loss": running / seen, "val_loss": val_loss, "val_dice": val_dice}
            for name, value in history.items():
                live.log_metric(name, round(value, 6))
            live.next_step()
            print(f"epoch {epoch + 1}/{params.epochs}: train loss {history['train_loss']:.4f}, "
                  f"val loss {val_loss:.4f}, val dice {val_dice:.4f}, {time.perf_counter() - start:.0f} s", flush=True)

    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(paths.model, model_config, state_dict, meta)
    elapsed = time.perf_counter() - start
    print(f"train {dataset}: {elapsed:.0f} s, {params.epochs * samples_per_epoch / elapsed:.0f} images/s "
          f"(with validation), peak RSS {peak_rss_mib():.0f} MiB")
    return history


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    args = parser.parse_args(argv)
    try:
        train(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        print(f"train {args.dataset}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
