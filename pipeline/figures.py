"""Render's pictures of a model's predictions on a prepared test split, drawn with matplotlib's Agg canvas.

A binary task gets, per test image, an overlay of true positives, false positives and false negatives (outside
the field of view dimmed) and a probability map; a multiclass task a mosaic of the first grid x grid images
coloured by class, the same mosaic with every wrong pixel highlighted, and the confusion matrix. The split is
read batch by batch (binary) or only the images the mosaic shows, each predicted and drawn at its own size.
``matplotlib.figure.Figure`` is used directly: no pyplot state, no display.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.patches import Patch

from pipeline.inference import logits_to_labels, predict_batches
from pipeline.prepared import DatasetMeta, PreparedSplit
from pipeline.stage import StageError
from pipeline.viz import (
    ERROR_COLORS,
    OUTCOMES,
    dimmed,
    error_map,
    mosaic,
    outcome_labels,
    overlay,
    pad_to,
    to_rgb,
    upscale,
)

# A power of two: width / DPI * DPI is then exact in floating point, so a figure is exactly as many pixels
# wide as the picture it shows (with DPI = 100, 1120 px could come out as 1119).
DPI = 128
FONT_SIZE = 8  # points: 14 px at 128 dpi
LEGEND_PATCH_PX, LEGEND_CHAR_PX, LEGEND_ROW_PX = 32, 8, 24  # room for a legend entry's patch, text, row
JPEG = {"format": "jpeg", "pil_kwargs": {"quality": 90}}


def drawn_size(task: str, sizes: list[tuple[int, int]], grid: int) -> tuple[int, int]:
    """The size, in image pixels, that the test images of ``sizes`` (in split order) are drawn at.

    A binary task draws every image alone: the largest (by pixels) makes the largest picture. A multiclass
    mosaic shows the first grid x grid images, tiled at the largest height and width among them.
    """
    if task == "binary":
        return max(sizes, key=lambda size: size[0] * size[1])
    shown = sizes[: grid**2]
    return max(h for h, _ in shown), max(w for _, w in shown)


def legend_handles(names, colors) -> list[Patch]:
    return [Patch(facecolor=np.asarray(c) / 255, edgecolor="none", label=name) for name, c in zip(names, colors)]


def save_picture(
    path: Path, picture: np.ndarray, handles: list[Patch], tile: tuple[int, int] | None = None, **save
) -> None:
    """``picture`` pixel for pixel with a legend band below: the file is W px wide, H + band high.

    ``tile``: the size of a mosaic's tiles in screen pixels, to draw thin lines between them.
    """
    h, w = picture.shape[:2]
    entry = LEGEND_PATCH_PX + LEGEND_CHAR_PX * max(len(handle.get_label()) for handle in handles)
    columns = max(1, min(len(handles), w // entry))
    band = LEGEND_ROW_PX * math.ceil(len(handles) / columns) + 8
    fig = Figure(figsize=(w / DPI, (h + band) / DPI), dpi=DPI)
    ax = fig.add_axes((0, band / (h + band), 1, h / (h + band)))
    ax.imshow(picture, interpolation="nearest")
    if tile is not None:
        for y in range(tile[0], h, tile[0]):
            ax.axhline(y - 0.5, color="0.4", linewidth=0.5)
        for x in range(tile[1], w, tile[1]):
            ax.axvline(x - 0.5, color="0.4", linewidth=0.5)
    ax.set_axis_off()
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=columns,
        frameon=False,
        fontsize=FONT_SIZE,
        handlelength=1.2,
        columnspacing=1.0,
        borderaxespad=0.3,
    )
    fig.savefig(path, dpi=DPI, **save)


def plot_confusion(path: Path, classes: list[str], matrix: np.ndarray) -> None:
    """Row-normalised confusion matrix on a log colour scale: the few errors stay visible beside the diagonal."""
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    nonzero = share[share > 0]
    norm = LogNorm(vmin=min(nonzero.min(), 1e-3) if nonzero.size else 1e-3, vmax=1)
    k = len(classes)
    fig = Figure(figsize=(1.5 + 0.55 * k, 1.2 + 0.5 * k), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_equal(share, 0), cmap="viridis", norm=norm)  # log has no 0: leave it blank
    fig.colorbar(image, ax=ax, label="share of the true class's pixels")
    if k <= 20:  # beyond that the numbers would not fit in the cells
        for (t, p), value in np.ndenumerate(share):
            if value > 0:
                text = f"{100 * value:.1f}" if value >= 0.0005 else "<0.1"
                ax.text(
                    p, t, text, ha="center", va="center", fontsize=6, color="black" if norm(value) > 0.6 else "white"
                )
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=FONT_SIZE)
    ax.set_yticks(range(k), classes, fontsize=FONT_SIZE)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (% of each true class)", fontsize=10)
    fig.savefig(path)


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    """The confusion matrix evaluate wrote into ``evaluation.json``: its classes and counts."""
    try:
        data = json.loads(path.read_text())
        classes = data["confusion"]["classes"]
        matrix = np.asarray(data["confusion"]["matrix"], dtype=np.int64)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the evaluate stage first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise StageError(f"{path}: not an evaluation written by evaluate: {e!r}") from None
    if matrix.shape != (len(classes), len(classes)):
        raise StageError(f"{path}: a {matrix.shape} confusion matrix for {len(classes)} classes")
    return classes, matrix


# ------------------------------------------------------------------------------------------ a test split


def render_multiclass(model, meta: DatasetMeta, test: PreparedSplit, confusion, settings, tta: str, device, out: Path):
    """``overlay_grid.png``, ``error_grid.png`` and ``confusion.png`` into ``out``; ``settings``: render's
    parameters (grid, alpha, scale, batch_size), ``confusion``: :func:`read_confusion`'s."""
    # Only the mosaic's images are read: no more pixels than the picture shows, which render's bound limits.
    n = min(settings.grid**2, len(test))
    samples = [test.read(i, ("image", "mask")) for i in range(n)]
    # Each run of consecutive images of one size is predicted in batches of batch_size: the batches
    # PreparedSplit.batches makes (with images of one size, those of predict_batches over the first n images).
    preds = []
    for _, same_size in itertools.groupby(samples, key=lambda sample: sample.image.shape):
        images = np.stack([sample.image for sample in same_size])
        for _, logits in predict_batches(model, images, settings.batch_size, device, tta):
            preds.extend(logits_to_labels(logits).numpy())
    images, masks = [to_rgb(sample.image) for sample in samples], [sample.mask for sample in samples]
    height, width = drawn_size("multiclass", test.sizes, settings.grid)
    tile = (height * settings.scale, width * settings.scale)

    def grid_of(tiles: list[np.ndarray]) -> np.ndarray:
        return upscale(mosaic(np.stack([pad_to(t, height, width) for t in tiles]), settings.grid), settings.scale)

    picture = grid_of([overlay(image, p, meta.colors, settings.alpha) for image, p in zip(images, preds)])
    save_picture(out / "overlay_grid.png", picture, legend_handles(meta.classes[1:], meta.colors[1:]), tile)
    picture = grid_of([error_map(image, t, p) for image, t, p in zip(images, masks, preds)])
    save_picture(out / "error_grid.png", picture, legend_handles(ERROR_COLORS, ERROR_COLORS.values()), tile)

    plot_confusion(out / "confusion.png", *confusion)


def render_binary(model, test: PreparedSplit, settings, threshold: float, tta: str, device, out: Path) -> None:
    """``overlays/<id>.jpg`` and ``probabilities/<id>.jpg`` of every test image into ``out``."""
    (out / "overlays").mkdir()
    (out / "probabilities").mkdir()
    handles = legend_handles(OUTCOMES, OUTCOMES.values())
    palette = [(0, 0, 0), *OUTCOMES.values()]
    # One batch of images of one size in memory at a time, each drawn at its own size.
    for _, samples in test.batches(settings.batch_size, ("image", "mask", "fov")):
        ((_, logits),) = predict_batches(
            model, np.stack([sample.image for sample in samples]), len(samples), device, tta
        )
        probs = torch.sigmoid(logits[:, 0]).numpy()
        preds = logits_to_labels(logits, threshold).numpy()
        for sample, prob, pred in zip(samples, probs, preds):
            image = dimmed(to_rgb(sample.image).astype(np.float32), sample.fov)
            picture = overlay(image, outcome_labels(sample.mask, pred, sample.fov), palette, settings.alpha)
            save_picture(out / "overlays" / f"{sample.id}.jpg", upscale(picture, settings.scale), handles, **JPEG)
            imsave(
                out / "probabilities" / f"{sample.id}.jpg",
                upscale(prob, settings.scale),
                cmap="gray",
                vmin=0,
                vmax=1,
                **JPEG,
            )
