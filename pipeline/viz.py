"""Colours over pixels: the overlays, error maps and picture files that render and predict draw alike.

Arrays in, arrays or Pillow pictures out (uint8 RGB unless said otherwise); no matplotlib (figures.py has it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.atomic import atomic_path
from pipeline.stage import StageError

ERROR_COLORS = {"correct": (110, 110, 110), "wrong": (255, 30, 30)}  # correct foreground neutral, errors loud
BACKGROUND_DIM = 0.3  # brightness kept by pixels that carry no information (background, outside the FOV)
OUTCOMES = {"true positive": (40, 220, 60), "false positive": (255, 40, 200), "false negative": (30, 120, 255)}
OVERLAY_ALPHA = 0.5  # predict's opacity of the predicted classes (render's default too)
JPEG_QUALITY = 90
PROBABILITY_LEVELS = 65535  # a 16-bit PNG's full range: p = 1 is white


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 1 or 3) -> uint8 (..., H, W, 3)."""
    if images.shape[-1] not in (1, 3):
        raise StageError(f"can only draw images with 1 or 3 channels, not {images.shape[-1]}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def upscale(picture: np.ndarray, scale: int) -> np.ndarray:
    """Nearest neighbour: every pixel of (H, W, ...) becomes a scale x scale block."""
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def dimmed(image: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``image`` RGB with the pixels outside ``valid`` dimmed, in float32: overlay rounds once, afterwards."""
    if valid is None:
        return image
    out = image.astype(np.float32)
    out[~valid] *= BACKGROUND_DIM
    return out


def overlay(image: np.ndarray, labels: np.ndarray, colors, alpha: float) -> np.ndarray:
    """``alpha * colors[label] + (1 - alpha) * image`` where the label is not 0 (nothing to show); uint8 RGB."""
    palette = np.asarray(colors, dtype=np.float32)
    out = image.astype(np.float32)
    painted = labels != 0
    out[painted] = alpha * palette[labels[painted]] + (1 - alpha) * out[painted]
    return np.rint(out).astype(np.uint8)


def error_map(image: np.ndarray, target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Background dimmed, correctly classified foreground neutral grey, every wrong pixel bright red."""
    out = np.rint(image * BACKGROUND_DIM).astype(np.uint8)
    out[(pred == target) & (target != 0)] = ERROR_COLORS["correct"]
    out[pred != target] = ERROR_COLORS["wrong"]
    return out


def outcome_labels(target: np.ndarray, pred: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    """0 for true negatives and pixels outside the FOV, else 1 + the index of the outcome in ``OUTCOMES``."""
    codes = np.array([0, 2, 3, 1], dtype=np.uint8)[2 * target.astype(np.intp) + pred]  # TN, FP, FN, TP
    if fov is not None:
        codes[~fov] = 0
    return codes


def reduced(picture: np.ndarray, width: int) -> np.ndarray:
    """(H, W, ...) uint8 or float32 shrunk to ``width`` pixels wide, each pixel the mean of the area it covers."""
    h, w = picture.shape[:2]
    source = picture if picture.dtype == np.uint8 else picture.astype(np.float32)  # float32: Pillow's mode F
    return np.asarray(Image.fromarray(source).resize((width, max(1, round(h * width / w))), Image.Resampling.BOX))


def densest_window(mask: np.ndarray, side: int) -> tuple[slice, slice]:
    """The ``side`` x ``side`` window (clipped to the image) with the most foreground: the first in row order."""
    h, w = mask.shape
    sh, sw = min(side, h), min(side, w)
    total = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = total[sh:, sw:] - total[:-sh, sw:] - total[sh:, :-sw] + total[:-sh, :-sw]
    y, x = np.unravel_index(np.argmax(counts), counts.shape)
    return slice(y, y + sh), slice(x, x + sw)


def pad_to(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """``picture`` (H, W, ...) in the top left corner of a black (height, width, ...) one: a mosaic's tile."""
    h, w = picture.shape[:2]
    return np.pad(picture, [(0, height - h), (0, width - w)] + [(0, 0)] * (picture.ndim - 2))


def mosaic(tiles: np.ndarray, grid: int) -> np.ndarray:
    """(n, H, W, ...) with n <= grid**2 -> (grid * H, grid * W, ...), row by row; missing tiles are black."""
    n, h, w, *rest = tiles.shape
    full = np.zeros((grid * grid, h, w, *rest), tiles.dtype)
    full[:n] = tiles
    return full.reshape(grid, grid, h, w, *rest).swapaxes(1, 2).reshape(grid * h, grid * w, *rest)


def label_picture(labels: np.ndarray, colors: list[list[int]]) -> Image.Image:
    """An indexed PNG's picture: the pixel value is the class, the palette the classes' colours."""
    picture = Image.fromarray(labels)
    picture.putpalette([value for color in colors for value in color])  # makes it a 'P' image
    return picture


def probability_picture(probabilities: np.ndarray) -> Image.Image:
    """16-bit gray, ``round(p * 65535)``, computed in float64: float32 would misround some levels."""
    return Image.fromarray(np.rint(probabilities.astype(np.float64) * PROBABILITY_LEVELS).astype(np.uint16))


def overlay_picture(image: np.ndarray, labels: np.ndarray, valid: np.ndarray | None, colors) -> Image.Image:
    """The predicted classes over the image, outside ``valid`` dimmed as render dims outside the field of view."""
    return Image.fromarray(overlay(dimmed(to_rgb(image), valid), labels, colors, OVERLAY_ALPHA))


def save(picture: Image.Image, path: Path) -> None:
    """Atomically, as JPEG (``.jpg``, 4:4:4: thin lines keep their colour) or PNG."""
    jpeg = {"format": "JPEG", "quality": JPEG_QUALITY, "subsampling": 0}
    with atomic_path(path) as tmp:
        picture.save(tmp, **(jpeg if path.suffix == ".jpg" else {"format": "PNG"}))
