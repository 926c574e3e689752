"""Pictures of what the model predicts on the test split: ``python -m pipeline.render <dataset>``.

Writes ``metrics/<dataset>/render/``, replaced as a whole (built aside, then renamed into place):

* multiclass: ``overlay_grid.png`` (the first grid x grid test images with the predicted classes coloured),
  ``error_grid.png`` (the same mosaic with every wrong pixel highlighted) and ``confusion.png`` (from the
  confusion matrix in evaluate's ``evaluation.json``);
* binary: for every test image ``overlays/<id>.jpg`` (true positives, false positives and false negatives
  coloured on the photo, outside the field of view dimmed) and ``probabilities/<id>.jpg``. JPEG keeps the
  many full-size pictures small enough for git.

The test split is read from the prepared shards as it is drawn, never as a whole: a binary task batch by batch
(``PreparedSplit.batches``: consecutive images of one size, stacked), a multiclass task only the images its
mosaic shows. Each image is predicted and drawn at its own size; a mosaic of images of different sizes tiles
them at the largest height and width among them, each image in the top left corner of its tile.

Figures are drawn with ``matplotlib.figure.Figure`` directly, which renders with Agg and never touches
pyplot's global state or a display.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.patches import Patch

from pipeline.atomic import atomic_path
from pipeline.checkpoint import check_input_channels, load_model
from pipeline.inference import TTA, logits_to_labels, predict_batches
from pipeline.params import PARAMS_FILE, load_params, require
from pipeline.prepared import DatasetMeta, PreparedSplit, open_split
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, StageError, run

# A power of two: width / DPI * DPI is then exact in floating point, so a figure is exactly as many pixels
# wide as the picture it shows (with DPI = 100, 1120 px could come out as 1119).
DPI = 128
FONT_SIZE = 8  # points: 14 px at 128 dpi
LEGEND_PATCH_PX, LEGEND_CHAR_PX, LEGEND_ROW_PX = 32, 8, 24  # room for a legend entry's patch, text, row
JPEG = {"format": "jpeg", "pil_kwargs": {"quality": 90}}

ERROR_COLORS = {"correct": (110, 110, 110), "wrong": (255, 30, 30)}  # correct foreground neutral, errors loud
BACKGROUND_DIM = 0.3  # brightness kept by pixels that carry no information (background, outside the FOV)
OUTCOMES = {"true positive": (40, 220, 60), "false positive": (255, 40, 200), "false negative": (30, 120, 255)}


# matplotlib draws a picture with about 130 bytes per pixel (measured: 2896 x 2896 px peaked 1.0 GiB above the
# stage's 0.5 GiB): this keeps render's peak near 1 GiB; grid 32 x scale 16 on MNIST (a 14,336 px square) took 21.7 GiB.
MAX_PICTURE_SIDE = 2048
MAX_PICTURE_PIXELS = MAX_PICTURE_SIDE**2


@dataclass(frozen=True)
class RenderParams:
    grid: int = 10  # a grid x grid mosaic of test images
    alpha: float = 0.5  # opacity of the predicted mask over the image
    scale: int = 4  # each image pixel becomes scale x scale screen pixels
    batch_size: int = 16  # images per forward pass

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(1 <= self.grid <= 32, f"{key}.grid", f"must be in [1, 32], got {self.grid}")
        require(0 <= self.alpha <= 1, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        require(1 <= self.scale <= 16, f"{key}.scale", f"must be in [1, 16], got {self.scale}")

    def check_picture(self, key: str, task: str, height: int, width: int) -> None:
        """Before drawing: grid and scale may not make a picture of ``height`` x ``width`` test images larger
        than MAX_PICTURE_PIXELS (one image at grid 1 and scale 1 is drawn whatever its size)."""
        tiles = 1 if task == "binary" else self.grid  # a binary task draws each image alone
        h, w = tiles * height * self.scale, tiles * width * self.scale
        settings = f"grid {self.grid} x scale {self.scale}" if tiles > 1 else f"scale {self.scale}"
        require(
            h * w <= max(MAX_PICTURE_PIXELS, height * width),
            key,
            f"{settings} draws a {h} x {w} picture of the {height} x {width} test images ({h * w:,} pixels); "
            f"at most {MAX_PICTURE_PIXELS:,} ({MAX_PICTURE_SIDE} x {MAX_PICTURE_SIDE}): lower "
            f"{'grid or scale' if tiles > 1 else 'scale'}",
        )


# ------------------------------------------------------------------------------------------ pixels


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 1 or 3) -> uint8 (..., H, W, 3)."""
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.shape[-1] == 3:
        return images
    raise StageError(f"can only draw images with 1 or 3 channels, not {images.shape[-1]}")


def upscale(picture: np.ndarray, scale: int) -> np.ndarray:
    """Nearest neighbour: every pixel of (H, W, ...) becomes a scale x scale block."""
    return picture.repeat(scale, axis=0).repeat(scale, axis=1)


def overlay(image: np.ndarray, labels: np.ndarray, colors, alpha: float) -> np.ndarray:
    """``alpha * colors[label] + (1 - alpha) * image`` on every pixel whose label is not 0; uint8 RGB.

    Label 0 (background, or "nothing to show") keeps the image's own pixel.
    """
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
    # Indexed by 2 * target + pred: TN, FP, FN, TP.
    codes = np.array([0, 2, 3, 1], dtype=np.uint8)[2 * target.astype(np.intp) + pred]
    if fov is not None:
        codes[~fov] = 0
    return codes


def pad_to(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """``picture`` (H, W, ...) in the top left corner of a black (height, width, ...) one: a mosaic's tile."""
    if picture.shape[:2] == (height, width):
        return picture
    out = np.zeros((height, width, *picture.shape[2:]), picture.dtype)
    out[: picture.shape[0], : picture.shape[1]] = picture
    return out


def drawn_size(task: str, sizes: list[tuple[int, int]], grid: int) -> tuple[int, int]:
    """The size, in image pixels, that the test images of ``sizes`` (in split order) are drawn at.

    A binary task draws every image alone: the largest (by pixels) makes the largest picture. A multiclass
    mosaic shows the first grid x grid images, tiled at the largest height and width among them.
    """
    if task == "binary":
        return max(sizes, key=lambda size: size[0] * size[1])
    shown = sizes[: grid**2]
    return max(h for h, _ in shown), max(w for _, w in shown)


def mosaic(tiles: np.ndarray, grid: int) -> np.ndarray:
    """(n, H, W, ...) with n <= grid**2 -> (grid * H, grid * W, ...), row by row; missing tiles are black."""
    n, h, w, *rest = tiles.shape
    full = np.zeros((grid * grid, h, w, *rest), tiles.dtype)
    full[:n] = tiles
    return full.reshape(grid, grid, h, w, *rest).swapaxes(1, 2).reshape(grid * h, grid * w, *rest)


# ------------------------------------------------------------------------------------------ figures


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


# ------------------------------------------------------------------------------------------ tasks


def read_evaluation(path: Path) -> tuple[list[str], np.ndarray, float | None, str]:
    """The confusion matrix evaluate wrote, the operating threshold it scored a binary task at, and its
    test-time augmentation."""
    try:
        data = json.loads(path.read_text())
        classes = data["confusion"]["classes"]
        matrix = np.asarray(data["confusion"]["matrix"], dtype=np.int64)
        threshold = data["scores"].get("threshold")
        tta = data["scores"]["tta"]
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the evaluate stage first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise StageError(f"{path}: not an evaluation written by evaluate: {e!r}") from None
    if matrix.shape != (len(classes), len(classes)):
        raise StageError(f"{path}: a {matrix.shape} confusion matrix for {len(classes)} classes")
    if threshold is not None and not (isinstance(threshold, float) and 0 < threshold < 1):
        raise StageError(f"{path}: scores.threshold must be a number in (0, 1), got {threshold!r}")
    if tta not in TTA:
        raise StageError(f"{path}: scores.tta must be one of {list(TTA)}, got {tta!r}")
    return classes, matrix, threshold, tta


def render_multiclass(
    model,
    meta: DatasetMeta,
    test: PreparedSplit,
    confusion: tuple[list[str], np.ndarray],
    settings: RenderParams,
    tta: str,
    device,
    out: Path,
) -> None:
    # Only the mosaic's images are read: no more pixels than the picture shows, which MAX_PICTURE_PIXELS bounds.
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


def render_binary(
    model, test: PreparedSplit, settings: RenderParams, threshold: float, tta: str, device, out: Path
) -> None:
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
            image = to_rgb(sample.image).astype(np.float32)
            if sample.fov is not None:
                image[~sample.fov] *= BACKGROUND_DIM
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


def render(dataset: str) -> str:
    """Draw ``metrics/<dataset>/render/`` from the checkpoint and the test split."""
    paths = DatasetPaths(dataset)
    settings = load_params(dataset, "render", RenderParams)
    device = setup(0)
    model, meta = load_model(paths, device)
    test = open_split(paths.prepared, "test")
    check_input_channels(model, paths.model, test.channels, test.where)
    # From the index, before any image is read: the size the pictures will be drawn at.
    settings.check_picture(
        f"{PARAMS_FILE}: {dataset}.render", meta.task, *drawn_size(meta.task, test.sizes, settings.grid)
    )
    # Read before drawing anything: a missing evaluate output should fail fast. The pictures show the
    # predictions at the threshold and test-time augmentation evaluate scored, so that they agree with the metrics.
    *confusion, threshold, tta = read_evaluation(paths.evaluation)
    with atomic_path(paths.metrics / "render") as out:
        out.mkdir()
        if meta.task == "binary":
            render_binary(model, test, settings, threshold, tta, device, out)
        else:
            render_multiclass(model, meta, test, confusion, settings, tta, device, out)
    return f"render {dataset}: pictures of the test predictions -> {paths.metrics / 'render'}"


if __name__ == "__main__":
    run(render)
