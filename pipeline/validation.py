"""The validation pass after each training epoch: the loss and foreground Dice of a whole split, on the device.

Batches of same-size images, padded and cropped back as inference does; an image larger than a tile is scored
tile by tile. With several processes each rank scores a contiguous run of the batches, the sums all-reduced.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline import precision as amp
from pipeline.confusion import ConfusionMatrix
from pipeline.distributed import shard
from pipeline.inference import OVERLAP, TILE, logits_to_labels, pad_to_multiple, tiles, to_input
from pipeline.loader import training_target
from pipeline.losses import IGNORE, Loss
from pipeline.prepared import DatasetMeta, PreparedSplit
from pipeline.runtime import release_free_memory


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """The n x n confusion matrix (flat) of the valid pixels of a batch."""
    valid = target != IGNORE
    return torch.bincount(target[valid].long() * n + logits_to_labels(logits)[valid].long(), minlength=n * n)


def _score_tiled(model, images, target, loss: Loss, counts, n: int, device, precision: str) -> torch.Tensor:
    """The loss of a batch of images larger than a tile, from the tiles' sums; adds the confusion counts."""
    sums = 0
    for image, image_target in zip(images, target):
        with amp.autocast(precision, device):
            for rows, cols, logits in tiles(model, image.numpy(), device, tile=TILE, overlap=OVERLAP):
                part, logits = image_target[None, rows, cols], logits.float()
                sums = sums + loss.sums(logits, part)
                counts += confusion_counts(logits, part, n)
        del logits, part
        release_free_memory()  # image by image: what a large image's tiles left must not pile up
    return loss.from_sums(sums)


def _score_whole(model, images, target, loss: Loss, counts, n: int, device, precision: str) -> torch.Tensor:
    with amp.autocast(precision, device):
        batch, (h, w) = pad_to_multiple(to_input(images, device), model.size_multiple)
        logits = model(batch)[..., :h, :w]
    logits = logits.float()
    value = loss(logits, target)
    counts += confusion_counts(logits, target, n)
    return value


@torch.inference_mode()
def validate(
    model, split: PreparedSplit, meta: DatasetMeta, loss: Loss, batch_size: int, device, precision="fp32", group=None
) -> tuple[float, float]:
    """Loss and foreground Dice over a whole split (pixels outside the FOV excluded), read once at the end."""
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
        score = _score_tiled if max(images.shape[1:3]) > TILE else _score_whole
        total_loss += score(model, images, target, loss, counts, n, device, precision).double() * len(target)
        seen += len(target)
    total_images = torch.tensor(float(seen), dtype=torch.float64, device=device)
    if group is not None:
        summed = group.all_reduce(torch.stack([total_loss, total_images]))
        total_loss, total_images = summed[0], summed[1]
        group.all_reduce(counts)
    confusion = ConfusionMatrix(n)
    confusion.matrix += counts.cpu().reshape(n, n)
    return total_loss.item() / int(total_images.item()), confusion.summary(meta.classes)["dice"] or 0.0
