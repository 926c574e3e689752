"""Running a trained network on uint8 images: padding, test-time augmentation, batches and tiles.

:func:`predict_batches` is what evaluate, render and validation run; :class:`Predictor` is predict's. Design:
docs/inference.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# Test-time augmentation: the (vertical flip, horizontal flip, quarter turn) views whose probabilities are averaged.
TTA = {
    "none": [(False, False, False)],
    "flips": [(v, h, False) for v in (False, True) for h in (False, True)],
    "dihedral": [(v, h, t) for t in (False, True) for v in (False, True) for h in (False, True)],
}
TILE, OVERLAP = 1024, 128  # larger images are predicted in tiles, each keeping its centre


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1], channels-last in memory (faster convs on CPU)."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(N, C, H, W) reflect-padded on the bottom and right to sides that are multiples, and its original (H, W)."""
    h, w = batch.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        batch = F.pad(batch, [0, pad_w, 0, pad_h], mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    return batch, (h, w)


def _transform(batch: torch.Tensor, vflip: bool, hflip: bool, turn: bool, inverse: bool = False) -> torch.Tensor:
    dims = [d for d, flip in ((-2, vflip), (-1, hflip)) if flip]
    if inverse:
        batch = torch.rot90(batch, -1, (-2, -1)) if turn else batch
        return torch.flip(batch, dims) if dims else batch
    batch = torch.flip(batch, dims) if dims else batch
    return torch.rot90(batch, 1, (-2, -1)) if turn else batch


def _logits(model, batch: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits, or with TTA those of the probabilities averaged over the views (in float64: none rounds to 0 or 1)."""

    def forward(batch: torch.Tensor) -> torch.Tensor:
        padded, (h, w) = pad_to_multiple(batch, model.size_multiple)
        return model(padded)[..., :h, :w].float()

    if tta == "none":
        return forward(batch)
    total = 0
    for vflip, hflip, turn in TTA[tta]:
        view = _transform(batch, vflip, hflip, turn).contiguous(memory_format=torch.channels_last)
        logits = _transform(forward(view), vflip, hflip, turn, inverse=True).double()
        total = total + (torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1))
    mean = total / len(TTA[tta])
    if mean.shape[1] == 1:
        return (torch.log(mean) - torch.log1p(-mean)).float()
    return torch.log(mean).float()


class Span(NamedTuple):
    """One tile along one side: it reads ``[start, end)`` and keeps ``[keep_start, keep_end)`` of it."""

    start: int
    end: int
    keep_start: int
    keep_end: int


def tile_spans(length: int, tile: int, overlap: int, multiple: int) -> list[Span]:
    """Tiles along one side, starting on multiples, each overlap cut at its middle (docs/inference.md)."""
    if length <= tile:
        return [Span(0, length, 0, length)]
    # The last tile ends at the image's end, at most a step after the one before.
    starts = [*range(0, length - tile, tile - 2 * overlap), -(-(length - tile) // multiple) * multiple]
    ends = [min(start + tile, length) for start in starts]
    cuts = [0, *((following + end) // 2 for following, end in zip(starts[1:], ends)), length]
    return [Span(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def _windows(size: tuple[int, int], tile: int, overlap: int, multiple: int):
    """``(read, kept, target)`` (rows, cols) slices per tile: of the image, of the tile, of the image again."""
    for rows in tile_spans(size[0], tile, overlap, multiple):
        for cols in tile_spans(size[1], tile, overlap, multiple):
            yield (
                (slice(rows.start, rows.end), slice(cols.start, cols.end)),
                tuple(slice(s.keep_start - s.start, s.keep_end - s.start) for s in (rows, cols)),
                (slice(rows.keep_start, rows.keep_end), slice(cols.keep_start, cols.keep_end)),
            )


def tiles(model, image: np.ndarray, device, tta: str = "none", tile: int = TILE, overlap: int = OVERLAP):
    """``(rows, cols, logits)`` per tile of one uint8 (H, W, C) image: the logits of the part it keeps, on the device;
    tile and overlap rounded to the model's multiple, down and up."""
    multiple = model.size_multiple
    tile, overlap = max(multiple, tile // multiple * multiple), -(-overlap // multiple) * multiple
    tile = max(tile, 2 * overlap + multiple)
    for read, kept, target in _windows(image.shape[:2], tile, overlap, multiple):
        logits = _logits(model, to_input(image[(None, *read)], device), tta)
        yield *target, logits[(..., *kept)]


def tiled_logits(model, image: np.ndarray, device, tta: str = "none", tile: int = TILE, overlap: int = OVERLAP):
    """Logits (1, K, H, W) on the CPU of one uint8 (H, W, C) image, assembled from its :func:`tiles`."""
    out = None
    for rows, cols, logits in tiles(model, image, device, tta, tile, overlap):
        if out is None:
            out = torch.empty((1, logits.shape[1], *image.shape[:2]), dtype=logits.dtype)
        out[..., rows, cols] = logits.cpu()
    return out


@torch.inference_mode()
def predict_batches(model, images: np.ndarray, batch_size: int, device, tta: str = "none", tile: int = TILE):
    """``(index slice, logits)`` per batch; logits float32 (B, K, H, W) on the CPU, K = 1 for a binary model;
    images larger than ``tile`` on a side are predicted one by one, in tiles."""
    model.eval()
    large = max(images.shape[1:3], default=0) > tile
    for start in range(0, len(images), batch_size):
        index = slice(start, min(start + batch_size, len(images)))
        if large:
            logits = torch.cat([tiled_logits(model, image, device, tta, tile) for image in images[index]])
        else:
            logits = _logits(model, to_input(images[index], device), tta)
        yield index, logits.cpu()


def logits_to_labels(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Class index per pixel: argmax for multiclass, ``sigmoid > threshold`` for a one-logit binary model."""
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0]) > threshold).to(torch.uint8)
    return logits.argmax(dim=1).to(torch.uint8)


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 (h, w), class indices
    probabilities: np.ndarray | None  # float32 (h, w), the foreground's, for a binary task


class Predictor:
    """A network and how its logits become predictions; ``tile`` and ``overlap`` already rounded (segment.py)."""

    def __init__(self, model, binary: bool, device, threshold: float, tta: str, tile: int, overlap: int):
        self.model, self.binary, self.device = model, binary, device
        self.threshold, self.tta, self.tile, self.overlap = threshold, tta, tile, overlap

    def batch(self, images: np.ndarray) -> list[Prediction]:
        """uint8 (N, H, W, C) in one forward pass, exactly as evaluate runs its batches."""
        tile = max(self.tile, *images.shape[1:3])  # tiled by tiled(), if at all
        ((_, logits),) = predict_batches(self.model, images, len(images), self.device, self.tta, tile)
        labels = logits_to_labels(logits, self.threshold).numpy()
        probabilities = torch.sigmoid(logits[:, 0]).numpy() if self.binary else [None] * len(labels)
        return [Prediction(label, p) for label, p in zip(labels, probabilities)]

    def tiled(self, image: np.ndarray) -> Prediction:
        """uint8 (H, W, C) tile by tile, one forward pass each, each tile's centre kept."""
        labels = np.zeros(image.shape[:2], np.uint8)
        probabilities = np.zeros(image.shape[:2], np.float32) if self.binary else None
        for read, kept, target in _windows(image.shape[:2], self.tile, self.overlap, self.model.size_multiple):
            (prediction,) = self.batch(image[(None, *read)].copy())
            labels[target] = prediction.labels[kept]
            if probabilities is not None:
                probabilities[target] = prediction.probabilities[kept]
        return Prediction(labels, probabilities)
