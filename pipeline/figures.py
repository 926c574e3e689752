"""Render's pictures of a model's predictions on a prepared test split, drawn on matplotlib's Agg canvas.

``matplotlib.figure.Figure`` directly: no pyplot state, no display. What each task draws: docs/inference.md.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline import viz
from pipeline.atomic import atomic_path
from pipeline.inference import logits_to_labels, predict_batches
from pipeline.prepared import DatasetMeta, PreparedSplit
from pipeline.stage import StageError
from pipeline.tasks import TASKS

# A power of two, so that width / DPI * DPI is exact: a figure is exactly as many pixels wide as its picture.
DPI = 128
FONT_SIZE = 8  # points
LEGEND_PATCH_PX, LEGEND_CHAR_PX, LEGEND_ROW_PX = 32, 8, 24  # room for a legend entry's patch, text, row
# No chroma subsampling (4:4:4): with 4:2:0 a 1-pixel false positive or negative loses its legend colour.
JPEG = {"format": "jpeg", "pil_kwargs": {"quality": 90, "subsampling": 0}}
LEGEND = {"loc": "lower center", "frameon": False, "fontsize": FONT_SIZE, "handlelength": 1.2, "columnspacing": 1.0}


def legend_handles(names, colors) -> list[Patch]:
    return [Patch(facecolor=np.asarray(c) / 255, edgecolor="none", label=name) for name, c in zip(names, colors)]


def save_picture(path: Path, picture: np.ndarray, handles: list[Patch], tile=None, **save) -> None:
    """``picture`` pixel for pixel with a legend band below; ``tile``: a mosaic's tile (H, W), lines drawn between."""
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
    fig.legend(handles=handles, ncol=columns, borderaxespad=0.3, **LEGEND)
    fig.savefig(path, dpi=DPI, **save)


def save_probability(path: Path, probability: np.ndarray, valid: np.ndarray | None, label: str) -> None:
    """A probability map pixel for pixel on a 0-1 colour scale, shown in a bar below; outside ``valid`` grey."""
    h, w = probability.shape
    band = 48
    fig = Figure(figsize=(w / DPI, (h + band) / DPI), dpi=DPI)
    ax = fig.add_axes((0, band / (h + band), 1, h / (h + band)))
    shown = probability if valid is None else np.ma.masked_where(~valid, probability)
    image = ax.imshow(shown, cmap=colormaps["magma"].with_extremes(bad="0.5"), vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    bar = fig.add_axes((0.15, 20 / (h + band), 0.7, 8 / (h + band)))
    fig.colorbar(image, cax=bar, orientation="horizontal")
    bar.tick_params(labelsize=FONT_SIZE, length=2, pad=1)
    bar.set_title(label, fontsize=FONT_SIZE, pad=2)
    fig.savefig(path, dpi=DPI, **JPEG)


def plot_confusion(path: Path, classes: list[str], matrix: np.ndarray) -> None:
    """Row-normalised confusion matrix on a log colour scale: the few errors stay visible beside the diagonal."""
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    nonzero = share[share > 0]
    norm = LogNorm(vmin=min(nonzero.min(), 1e-3) if nonzero.size else 1e-3, vmax=1)
    k = len(classes)
    fig = Figure(figsize=(1.3 + 0.29 * k, 1.1 + 0.27 * k), dpi=100, layout="constrained")  # 11 classes: 449 px
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_equal(share, 0), cmap="viridis", norm=norm)  # log has no 0: leave it blank
    fig.colorbar(image, ax=ax, label="share of the true class's pixels")
    for (t, p), value in np.ndenumerate(share):
        if value > 0 and k <= 20:  # beyond 20 classes the numbers would not fit
            text = f"{100 * value:.1f}" if value >= 0.0005 else "<0.1"
            color = "black" if norm(value) > 0.6 else "white"
            ax.text(p, t, text, ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=FONT_SIZE)
    ax.set_yticks(range(k), classes, fontsize=FONT_SIZE)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix (% of each true class)", fontsize=10)
    fig.savefig(path)


def read_confusion(path: Path) -> tuple[list[str], np.ndarray]:
    """The classes and counts of the confusion matrix evaluate wrote into ``evaluation.json``."""
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


def render_multiclass(model, meta: DatasetMeta, test: PreparedSplit, settings, evaluation, device, paths) -> None:
    """``overlay_grid.png``, ``error_grid.png`` and ``confusion.png`` (of evaluate's ``evaluation.json``)."""
    confusion = read_confusion(paths.evaluation)  # before drawing: a missing evaluate output fails fast
    samples = [test.read(i, ("image", "mask")) for i in range(min(settings.grid**2, len(test)))]  # the mosaic's
    preds = []  # each run of one size in batches: those PreparedSplit.batches makes
    for _, same_size in itertools.groupby(samples, key=lambda sample: sample.image.shape):
        images = np.stack([sample.image for sample in same_size])
        for _, logits in predict_batches(model, images, settings.batch_size, device, evaluation.tta):
            preds.extend(logits_to_labels(logits).numpy())
    images, masks = [viz.to_rgb(sample.image) for sample in samples], [sample.mask for sample in samples]
    height, width = TASKS["multiclass"].drawn_size(test.sizes, settings.grid)
    tile = (height * settings.scale, width * settings.scale)

    def grid_of(tiles: list[np.ndarray]) -> np.ndarray:
        padded = np.stack([viz.pad_to(t, height, width) for t in tiles])
        return viz.upscale(viz.mosaic(padded, settings.grid), settings.scale)

    overlays = grid_of([viz.overlay(image, p, meta.colors, settings.alpha) for image, p in zip(images, preds)])
    errors = grid_of([viz.error_map(image, t, p) for image, t, p in zip(images, masks, preds)])
    with atomic_path(paths.metrics / "render") as out:
        out.mkdir()
        save_picture(out / "overlay_grid.png", overlays, legend_handles(meta.classes[1:], meta.colors[1:]), tile)
        save_picture(out / "error_grid.png", errors, legend_handles(viz.ERROR_COLORS, viz.ERROR_COLORS.values()), tile)
        plot_confusion(out / "confusion.png", *confusion)


def render_binary(model, meta: DatasetMeta, test: PreparedSplit, settings, evaluation, device, paths) -> None:
    """``overlays/<id>.jpg`` and ``probabilities/<id>.jpg`` of every test image, batch by batch. An image drawn
    wider than ``max_width`` is shown whole at reduced size, and at full size in ``details/<id>.jpg``: the window
    of that width with the most true foreground, the same in every revision, so that its one-pixel errors show."""
    handles = legend_handles(viz.OUTCOMES, viz.OUTCOMES.values())
    palette = [(0, 0, 0), *viz.OUTCOMES.values()]
    label = f"probability of {meta.classes[1]} (grey: outside the field of view)"
    with atomic_path(paths.metrics / "render") as out:
        for directory in (out, out / "overlays", out / "probabilities"):
            directory.mkdir()
        for _, samples in test.batches(settings.batch_size, ("image", "mask", "fov")):
            images = np.stack([sample.image for sample in samples])
            ((_, logits),) = predict_batches(model, images, len(samples), device, evaluation.tta)
            probs = TASKS["binary"].foreground(logits).numpy()
            preds = logits_to_labels(logits, evaluation.threshold).numpy()
            for sample, prob, pred in zip(samples, probs, preds):
                image = viz.dimmed(viz.to_rgb(sample.image).astype(np.float32), sample.fov)
                labels = viz.outcome_labels(sample.mask, pred, sample.fov)
                picture = viz.upscale(viz.overlay(image, labels, palette, settings.alpha), settings.scale)
                prob = viz.upscale(prob, settings.scale)
                valid = None if sample.fov is None else viz.upscale(sample.fov, settings.scale)
                if picture.shape[1] > settings.max_width:
                    truth = viz.upscale(sample.mask, settings.scale) > 0
                    truth = truth if valid is None else truth & valid
                    (out / "details").mkdir(exist_ok=True)
                    detail = picture[viz.densest_window(truth, settings.max_width)]
                    save_picture(out / "details" / f"{sample.id}.jpg", detail, handles, **JPEG)
                    picture, prob = viz.reduced(picture, settings.max_width), viz.reduced(prob, settings.max_width)
                    if valid is not None:  # a reduced pixel counts as inside when most of its area is
                        valid = viz.reduced(valid.astype(np.float32), settings.max_width) > 0.5
                save_picture(out / "overlays" / f"{sample.id}.jpg", picture, handles, **JPEG)
                save_probability(out / "probabilities" / f"{sample.id}.jpg", prob, valid, label)


# What render runs for each task: (model, meta, test split, RenderParams, the release's Evaluation, device, paths).
RENDERERS = {"multiclass": render_multiclass, "binary": render_binary}
