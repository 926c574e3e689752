"""Running a trained network on uint8 images: inputs, padding, test-time augmentation, batches and tiles.

:func:`predict_batches` is what evaluate, render and train's validation run; :class:`Predictor` turns its logits
into labels and probabilities for predict, for a batch of images of one size or one large image in tiles.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1], channels-last in memory (faster convs on CPU)."""
    batch = torch.as_tensor(images).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def pad_to_multiple(batch: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad (N, C, H, W) on the bottom and right to sides that are multiples of ``multiple``.

    Returns the padded batch and the original (H, W); a batch that already fits is returned as it is.
    """
    h, w = batch.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if pad_h or pad_w:
        batch = F.pad(batch, [0, pad_w, 0, pad_h], mode="reflect" if min(h, w) > max(pad_h, pad_w) else "replicate")
    return batch, (h, w)


# Test-time augmentation: the transforms whose predictions are averaged, each (vertical flip, horizontal flip,
# quarter turn) applied to the input and undone on the output. "dihedral" is the square's 8 symmetries.
TTA = {
    "none": [(False, False, False)],
    "flips": [(v, h, False) for v in (False, True) for h in (False, True)],
    "dihedral": [(v, h, t) for t in (False, True) for v in (False, True) for h in (False, True)],
}


def _transform(batch: torch.Tensor, vflip: bool, hflip: bool, turn: bool, inverse: bool = False) -> torch.Tensor:
    dims = [d for d, flip in ((-2, vflip), (-1, hflip)) if flip]
    if inverse:
        batch = torch.rot90(batch, -1, (-2, -1)) if turn else batch
        return torch.flip(batch, dims) if dims else batch
    batch = torch.flip(batch, dims) if dims else batch
    return torch.rot90(batch, 1, (-2, -1)) if turn else batch


def _forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    padded, (h, w) = pad_to_multiple(batch, model.size_multiple)
    return model(padded)[..., :h, :w].float()


def _averaged_logits(model: nn.Module, batch: torch.Tensor, transforms: list[tuple[bool, bool, bool]]) -> torch.Tensor:
    """Logits whose probabilities are the mean of the probabilities over ``transforms`` (sigmoid for one output
    channel, softmax for several), computed in float64 so that no probability rounds to 0 or 1 on the way back."""
    total = None
    for vflip, hflip, turn in transforms:
        view = _transform(batch, vflip, hflip, turn).contiguous(memory_format=torch.channels_last)
        logits = _transform(_forward(model, view), vflip, hflip, turn, inverse=True)
        probs = torch.sigmoid(logits.double()) if logits.shape[1] == 1 else torch.softmax(logits.double(), dim=1)
        total = probs if total is None else total + probs
    mean = total / len(transforms)
    if mean.shape[1] == 1:
        return (torch.log(mean) - torch.log1p(-mean)).float()
    return torch.log(mean).float()


# Images larger than this on a side are predicted in overlapping tiles, one at a time, so that memory grows with
# the tile, not the image (a 2048 x 1024 frame at width 64 would hold gigabytes of activations); each tile keeps
# its centre, the overlap (the default STARE network's receptive field) cut at its middle. MNIST and STARE are
# predicted whole.
TILE, OVERLAP = 1024, 128


class Span(NamedTuple):
    """One tile along one side: it reads ``[start, end)`` and keeps ``[keep_start, keep_end)`` of it."""

    start: int
    end: int
    keep_start: int
    keep_end: int


def tile_spans(length: int, tile: int, overlap: int, multiple: int) -> list[Span]:
    """Tiles along one side of ``length`` pixels: starting on multiples of ``multiple``, ``tile`` long (the last
    one up to the end), each overlap cut at its middle, so that every kept pixel is at least ``overlap`` inside
    its tile or on the image's border."""
    if length <= tile:
        return [Span(0, length, 0, length)]
    step = tile - 2 * overlap
    # The last tile ends at the image's end, starting on the first multiple from which it reaches it; it is
    # at most `step` after the one before, so their overlap is at least 2 x overlap too.
    starts = [*range(0, length - tile, step), -(-(length - tile) // multiple) * multiple]
    ends = [min(start + tile, length) for start in starts]
    cuts = [0, *((following + end) // 2 for following, end in zip(starts[1:], ends)), length]
    return [Span(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def _logits(model: nn.Module, batch: torch.Tensor, tta: str) -> torch.Tensor:
    return _forward(model, batch) if tta == "none" else _averaged_logits(model, batch, TTA[tta])


def tiles(
    model: nn.Module,
    image: np.ndarray,
    device: torch.device | str,
    tta: str = "none",
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """``(rows, cols, logits)`` of one uint8 (H, W, C) image, tile by tile (tile and overlap rounded to the
    model's multiple, down and up): the logits (1, K, rows, cols) of the part of the image each tile keeps, on
    the device. An image no larger than a tile is one forward pass."""
    multiple = model.size_multiple
    tile, overlap = max(multiple, tile // multiple * multiple), -(-overlap // multiple) * multiple
    tile = max(tile, 2 * overlap + multiple)
    h, w = image.shape[:2]
    for rows in tile_spans(h, tile, overlap, multiple):
        for cols in tile_spans(w, tile, overlap, multiple):
            logits = _logits(model, to_input(image[None, rows.start : rows.end, cols.start : cols.end], device), tta)
            yield (
                slice(rows.keep_start, rows.keep_end),
                slice(cols.keep_start, cols.keep_end),
                logits[
                    ...,
                    rows.keep_start - rows.start : rows.keep_end - rows.start,
                    cols.keep_start - cols.start : cols.keep_end - cols.start,
                ],
            )


def tiled_logits(
    model: nn.Module,
    image: np.ndarray,
    device: torch.device | str,
    tta: str = "none",
    tile: int = TILE,
    overlap: int = OVERLAP,
) -> torch.Tensor:
    """Logits (1, K, H, W) on the CPU of one uint8 (H, W, C) image, assembled from its :func:`tiles`."""
    out = None
    for rows, cols, logits in tiles(model, image, device, tta, tile, overlap):
        if out is None:
            out = torch.empty((1, logits.shape[1], *image.shape[:2]), dtype=logits.dtype)
        out[..., rows, cols] = logits.cpu()
    return out


@torch.inference_mode()
def predict_batches(
    model: nn.Module,
    images: np.ndarray,
    batch_size: int,
    device: torch.device | str,
    tta: str = "none",
    tile: int = TILE,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(index slice, logits)`` per batch; logits are float32 (B, K, H, W) on the CPU.

    ``K`` is 1 for a binary model (sigmoid) and the number of classes for a multiclass one (softmax). Inputs
    are padded to the model's ``size_multiple`` only where their size is not one already (MNIST's 28 x 28
    is scored as it was trained), and the logits cropped back. With ``tta`` other than "none", the logits are
    those of the probabilities averaged over the ``TTA[tta]`` views of each batch (``len(TTA[tta])`` forward
    passes); "none" is one plain forward pass. Images larger than ``tile`` on a side are predicted one by one,
    in tiles (:func:`tiled_logits`).
    """
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
    probabilities: np.ndarray | None  # float32 (h, w), the positive class's, for a binary task


class Predictor:
    """A network and how its logits become labels and probabilities, for a batch of images or one in tiles.

    ``tile`` and ``overlap`` must be multiples of the network's ``size_multiple``, the tile at least
    ``2 * overlap + size_multiple`` (each tile keeps its centre: docs/inference.md)."""

    def __init__(self, model: nn.Module, binary: bool, device, threshold: float, tta: str, tile: int, overlap: int):
        self.model, self.binary, self.device = model, binary, device
        self.threshold, self.tta, self.tile, self.overlap = threshold, tta, tile, overlap

    def batch(self, images: np.ndarray) -> list[Prediction]:
        """uint8 (N, H, W, C) in one forward pass, exactly as evaluate runs its batches."""
        ((_, logits),) = predict_batches(
            self.model, images, len(images), self.device, self.tta, max(self.tile, *images.shape[1:3])
        )  # tiled by tiled(), if at all
        labels = logits_to_labels(logits, self.threshold).numpy()
        if not self.binary:
            return [Prediction(label, None) for label in labels]
        probabilities = torch.sigmoid(logits[:, 0]).numpy()
        return [Prediction(label, p) for label, p in zip(labels, probabilities)]

    def tiled(self, image: np.ndarray) -> Prediction:
        """uint8 (H, W, C) tile by tile, one forward pass each, each tile's centre kept."""
        h, w = image.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        probabilities = np.zeros((h, w), np.float32) if self.binary else None
        multiple = self.model.size_multiple
        for rows in tile_spans(h, self.tile, self.overlap, multiple):
            for cols in tile_spans(w, self.tile, self.overlap, multiple):
                (prediction,) = self.batch(image[None, rows.start : rows.end, cols.start : cols.end].copy())
                kept = (
                    slice(rows.keep_start - rows.start, rows.keep_end - rows.start),
                    slice(cols.keep_start - cols.start, cols.keep_end - cols.start),
                )
                target = (slice(rows.keep_start, rows.keep_end), slice(cols.keep_start, cols.keep_end))
                labels[target] = prediction.labels[kept]
                if probabilities is not None:
                    probabilities[target] = prediction.probabilities[kept]
        return Prediction(labels, probabilities)
