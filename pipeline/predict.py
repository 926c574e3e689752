"""Segment new images with a trained model: ``python -m pipeline.predict <dataset> <files or dirs> --out DIR``.

Not a DVC stage: it reads only ``data/models/<dataset>/model.pt`` (the classes and colours come from the
checkpoint, so the prepared data need not be present) and ``params.yaml``, and writes where it is told. An
input is an image file or a directory, searched recursively for image suffixes (sorted; hidden names and the
output directory itself skipped). For every input image, in ``--out``, each file written atomically:

* ``<stem>.png``: the label mask, an indexed ('P') PNG whose pixel value is the class index and whose palette
  is the classes' colours, so that a viewer shows the classes and a program reads the indices;
* ``<stem>_prob.png`` (binary tasks): the positive class's probability as a 16-bit grayscale PNG holding
  ``round(p * 65535)``; ``value / 65535`` is within 7.7e-6 of the float32 probability, so the label mask, not a
  threshold applied to this picture, is the prediction for pixels that close to the threshold;
* ``<stem>_overlay.jpg`` (or ``.png``): the image with the predicted classes painted over it as render paints
  them (alpha 0.5, background left as it is).

Pixels. Images are decoded as prepare decodes them (``pipeline.datasets.folder.read_image``: 8- or 16-bit,
gray, RGB, palette; the model's input channels decide gray or RGB). A ``folder`` dataset that resizes its
images (``<dataset>.prepare.scale``) is trained at that scale, so predict resizes each input the same way
before the model and brings the labels (nearest neighbour) and probabilities (bilinear) back to the input's
own size; ``--scale`` overrides it. A binary pixel is positive when its probability is above
``<dataset>.evaluate.threshold``, the operating point the metrics were computed at (``--threshold``), and the
probabilities are averaged over ``<dataset>.evaluate.tta``'s views as evaluate averages them (``--tta``).

Sizes. An input whose sides (after scaling) are both within ``--max-side`` runs whole, exactly as evaluate
runs a test image: reflect-padded to the model's multiple, cropped back. Consecutive inputs of one size are
batched (up to ``--batch-size``, by default ``<dataset>.evaluate.batch_size``, and ``--max-side``² pixels in
all, so that no forward pass needs more memory than one image of the largest size run whole). The same
images in the same batches, on the same device and thread count, give the same bits as evaluate: a prepared
test split saved as PNG files and passed in its order with evaluate's batch size is predicted exactly as
evaluate scored it (``benchmarks/predict_throughput.py`` checks STARE's).

A larger input is cut into overlapping tiles of ``--tile`` pixels a side, run one at a time, so memory grows
with the tile, not the image (only the image, its outputs and the overlay are held whole). Each tile keeps
its centre: the overlap of two neighbouring tiles is cut at its middle, so every kept pixel lies at least
``--overlap`` pixels inside its tile, except along the image's own borders. Tiles start on multiples of the
model's size multiple (tile and overlap are rounded to it), so each tile sees the pooling grid the whole image
would. A U-Net's output at a pixel depends only on the input within its receptive field; when that lies inside
the tile, the tile computes the same function as the whole image would, and only the arithmetic's rounding
can differ. Overlapping predictions are cropped rather than averaged because averaging mixes in each tile's
border pixels, those computed with zero padding instead of the image -- the least reliable predictions -- and
makes a pixel's result depend on how many tiles happen to cover it; cropping also needs no whole-image
accumulator of K float channels. The default overlap, 128, covers the receptive field of the default STARE
network (about 120 pixels by its layers, 110 by its gradients); for a network that sees farther, raise it.

Validity masks. ``--valid 'masks/{stem}_fov.png'`` names a mask per input (``{stem}``: the input's name
without its suffix; a pattern without it uses one mask for all), read as prepare reads validity masks (any
nonzero colour is valid). Outside it a pixel is background (label 0, probability 0) and the overlay is dimmed
as render dims pixels outside the field of view. The model still sees the whole image, as it did in training.

Errors. An input that cannot be read or decoded, is not a regular file (a device, a pipe), is larger than
``folder.MAX_FILE_BYTES`` or declares more pixels than ``folder.MAX_PIXELS`` (checked from its header, before
it is decoded), a missing validity mask, or a second input whose outputs would overwrite the first's (the same
stem) is one line on stderr naming the file; the other inputs are still
processed, and the exit status is 1 at the end. A progress bar runs on stderr when it is a terminal; stdout
gets one summary line (images, seconds, images/s and Mpixel/s of the inputs' own pixels, from the first image
read to the last output written, and the failures). A missing model or a bad parameter stops at once with one
line and status 1 (a :class:`StageError`, as in every stage); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.transform import resize as resize_to_shape
from torch import nn
from tqdm import tqdm

from pipeline.atomic import atomic_path
from pipeline.checkpoint import input_channels as model_input_channels
from pipeline.checkpoint import load_checkpoint
from pipeline.datasets.folder import decode_valid, open_file, read_image, resize
from pipeline.evaluate import EvaluateParams
from pipeline.inference import TTA, logits_to_labels, predict_batches, tile_spans
from pipeline.params import ParamError, load_params, read_params_file
from pipeline.prepared import DatasetMeta
from pipeline.render import BACKGROUND_DIM, overlay, to_rgb
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, StageError, shown_name

PROG = "python -m pipeline.predict"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm", ".pnm")
PROBABILITY_LEVELS = 65535  # a 16-bit PNG's full range: p = 1 is white
OVERLAY_ALPHA = 0.5  # as render draws predicted classes over an image
JPEG_QUALITY = 90  # as render's pictures
MAX_SCALE = 16  # as folder's prepare.scale allows


@dataclass(frozen=True)
class Options:
    """What params.yaml and the command line decide; tile and overlap already rounded to the model's multiple."""

    threshold: float
    tta: str  # pipeline.inference.TTA
    batch_size: int
    scale: float
    max_side: int
    tile: int
    overlap: int
    valid: str | None  # validity mask pattern, with {stem}
    overlay_format: str  # "jpg" or "png"


@dataclass
class Job:
    """One input image on its way through: read, waiting for its batch, then written."""

    path: Path
    image: np.ndarray  # uint8 (H, W, C) as read: the overlay's base
    valid: np.ndarray | None  # bool (H, W)
    pixels: np.ndarray  # uint8 (h, w, C): what the model sees, the image resized by the scale


@dataclass
class Prediction:
    labels: np.ndarray  # uint8 (h, w), class indices
    probabilities: np.ndarray | None  # float32 (h, w), the positive class's, for a binary task


# ------------------------------------------------------------------------------------------ settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment images with a dataset's trained model: a label "
        "mask, a probability map (binary tasks) and an overlay per image.",
    )
    parser.add_argument("dataset", help="a dataset section of params.yaml whose model is trained, e.g. stare")
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help=f"image files, or directories searched recursively for {', '.join(IMAGE_SUFFIXES)}",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="directory for the outputs (created if needed)"
    )
    parser.add_argument("--threshold", type=float, help="binary tasks: default <dataset>.evaluate.threshold")
    parser.add_argument("--tta", choices=list(TTA), help="test-time augmentation: default <dataset>.evaluate.tta")
    parser.add_argument("--batch-size", type=int, help="images per forward pass: default <dataset>.evaluate.batch_size")
    parser.add_argument(
        "--scale", type=float, help="resize factor before the model: default <dataset>.prepare.scale where set, else 1"
    )
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are tiled (default %(default)s)")
    parser.add_argument(
        "--tile", type=int, default=1024, help="tile side, rounded down to the model's multiple (default %(default)s)"
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=128,
        help="context kept around each tile's centre, rounded up to the model's multiple (default %(default)s)",
    )
    parser.add_argument(
        "--valid", metavar="PATTERN", help="validity mask of each input, e.g. 'masks/{stem}_fov.png' (nonzero = valid)"
    )
    parser.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="default %(default)s")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per usable core)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_side", "tile", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.overlap < 0:
        parser.error(f"--overlap must be at least 0, got {args.overlap}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.scale is not None and not 0 < args.scale <= MAX_SCALE:
        parser.error(f"--scale must be in (0, {MAX_SCALE}], got {args.scale}")
    return args


def params_scale(dataset: str) -> float:
    """``<dataset>.prepare.scale`` where params.yaml sets it (folder datasets), else 1.

    Read from the raw file rather than through the folder schema: only this one key matters here, and a
    dataset of another kind has a prepare section that the folder schema would refuse. (load_params has
    already checked that the dataset's section is a mapping.)
    """
    prepare = read_params_file()[dataset].get("prepare")
    scale = prepare.get("scale", 1.0) if isinstance(prepare, dict) else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SCALE:
        raise ParamError(f"params.yaml: {dataset}.prepare.scale: must be a number in (0, {MAX_SCALE}], got {scale!r}")
    return float(scale)


def resolve_options(args: argparse.Namespace, evaluate: EvaluateParams, scale: float, multiple: int) -> Options:
    """The command line's values over params.yaml's; tile and overlap rounded to the model's ``multiple``."""
    # Down for the tile, so that memory stays within what was asked; up for the overlap, so that context does.
    tile = max(multiple, args.tile // multiple * multiple)
    overlap = -(-args.overlap // multiple) * multiple
    if tile - 2 * overlap < multiple:
        raise StageError(
            f"--tile {args.tile} leaves no centre inside --overlap {args.overlap} on both sides "
            f"(rounded to the model's multiple {multiple}: tile {tile}, overlap {overlap}); "
            f"the tile must be at least 2 x overlap + {multiple}"
        )
    return Options(
        threshold=evaluate.threshold if args.threshold is None else args.threshold,
        tta=evaluate.tta if args.tta is None else args.tta,
        batch_size=evaluate.batch_size if args.batch_size is None else args.batch_size,
        scale=scale,
        max_side=args.max_side,
        tile=tile,
        overlap=overlap,
        valid=args.valid,
        overlay_format=args.overlay_format,
    )


def input_channels(model: nn.Module, path: Path) -> int:
    """The channels the network reads, 1 (gray) or 3 (RGB): each input is read with as many, so they always fit."""
    channels = model_input_channels(model)
    if channels not in (1, 3):
        raise StageError(f"{path}: the model reads {channels}-channel images; predict reads gray (1) or RGB (3)")
    return channels


# ------------------------------------------------------------------------------------------ inputs


def output_names(stem: str, meta: DatasetMeta, overlay_format: str) -> list[str]:
    names = [f"{stem}.png", f"{stem}_overlay.{overlay_format}"]
    return names + [f"{stem}_prob.png"] if meta.task == "binary" else names


def list_inputs(arguments: list[Path], out: Path) -> list[tuple[Path, str | None]]:
    """``(file, None)`` for every image to run, ``(path, what is wrong)`` for an argument that gives none.

    A directory gives its image files, recursively and sorted, except hidden ones (``.``-names: editors' and
    file managers' leftovers) and any under ``out``, which would otherwise be read back as inputs on a rerun.
    """
    inputs: list[tuple[Path, str | None]] = []
    out = out.resolve()
    for argument in arguments:
        if argument.is_dir():
            files = sorted(
                p
                for p in argument.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(argument).parts)
                and not p.resolve().is_relative_to(out)
            )
            inputs += [(p, None) for p in files] or [(argument, f"no image files in it ({' '.join(IMAGE_SUFFIXES)})")]
        elif argument.exists():
            inputs.append((argument, None))
        else:
            inputs.append((argument, "no such file or directory"))
    return inputs


def claim_outputs(
    inputs: list[tuple[Path, str | None]], meta: DatasetMeta, overlay_format: str
) -> list[tuple[Path, str | None]]:
    """The inputs, with an error for each one whose output names an earlier input already has (same stem)."""
    owners: dict[str, Path] = {}
    claimed = []
    for path, problem in inputs:
        if problem is None:
            names = output_names(path.stem, meta, overlay_format)
            if taken := next((name for name in names if name in owners), None):
                problem = f"its output {taken} would overwrite that of {owners[taken]}; rename one of them"
            else:
                owners.update(dict.fromkeys(names, path))
        claimed.append((path, problem))
    return claimed


def read_valid(path: Path, pattern: str, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): the validity mask of input ``path``, which must have the image's size."""
    mask_path = Path(pattern.replace("{stem}", path.stem))
    try:
        with open_file(mask_path) as file:
            valid = decode_valid(file, str(mask_path))
    except OSError as e:
        raise StageError(f"{path}: its validity mask {mask_path} cannot be read ({e.strerror or e})") from None
    except StageError as e:
        raise StageError(f"{path}: validity mask {e}") from None
    if valid.shape != size:
        raise StageError(
            f"{path}: validity mask {mask_path} has {valid.shape[1]} x {valid.shape[0]} pixels, "
            f"the image {size[1]} x {size[0]}"
        )
    return valid


def read_job(path: Path, channels: int, options: Options) -> Job:
    image = read_image(path, str(path), channels)  # lazily: a device, a pipe or a huge file is refused first
    valid = None if options.valid is None else read_valid(path, options.valid, image.shape[:2])
    return Job(path, image, valid, resize(image, options.scale, nearest=False))


# ------------------------------------------------------------------------------------------ the model


class Predictor:
    """The network and how its logits become labels and probabilities, for a batch of images or one in tiles."""

    def __init__(self, model: nn.Module, meta: DatasetMeta, device: torch.device, options: Options):
        self.model, self.meta, self.device, self.options = model, meta, device, options

    def batch(self, images: np.ndarray) -> list[Prediction]:
        """uint8 (N, H, W, C) in one forward pass, exactly as evaluate runs its batches."""
        ((_, logits),) = predict_batches(
            self.model, images, len(images), self.device, self.options.tta, max(self.options.tile, *images.shape[1:3])
        )  # tiled by tiled(), if at all
        labels = logits_to_labels(logits, self.options.threshold).numpy()
        if self.meta.task != "binary":
            return [Prediction(label, None) for label in labels]
        probabilities = torch.sigmoid(logits[:, 0]).numpy()
        return [Prediction(label, p) for label, p in zip(labels, probabilities)]

    def tiled(self, image: np.ndarray) -> Prediction:
        """uint8 (H, W, C) tile by tile, each tile's centre kept (see the module's docstring for why)."""
        h, w = image.shape[:2]
        labels = np.zeros((h, w), np.uint8)
        probabilities = np.zeros((h, w), np.float32) if self.meta.task == "binary" else None
        multiple, tile, overlap = self.model.size_multiple, self.options.tile, self.options.overlap
        for rows in tile_spans(h, tile, overlap, multiple):
            for cols in tile_spans(w, tile, overlap, multiple):
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


# ------------------------------------------------------------------------------------------ outputs


def to_input_size(prediction: Prediction, size: tuple[int, int]) -> Prediction:
    """Undo the scale: labels by nearest neighbour, probabilities bilinearly, to exactly the input's size.

    folder.resize takes a factor, and ``round(round(h * s) / s)`` need not give ``h`` back; skimage's resize,
    which folder's rescale calls, takes the shape.
    """
    if prediction.labels.shape == size:
        return prediction
    labels = resize_to_shape(prediction.labels, size, order=0, preserve_range=True, anti_aliasing=False)
    probabilities = prediction.probabilities
    if probabilities is not None:
        shrinking = size[0] < probabilities.shape[0]
        probabilities = resize_to_shape(probabilities, size, order=1, preserve_range=True, anti_aliasing=shrinking)
        probabilities = probabilities.astype(np.float32)
    return Prediction(labels.astype(np.uint8), probabilities)


def masked(prediction: Prediction, valid: np.ndarray | None) -> Prediction:
    """Background, probability 0, outside the validity mask."""
    if valid is None:
        return prediction
    labels = np.where(valid, prediction.labels, 0).astype(np.uint8)
    probabilities = None if prediction.probabilities is None else np.where(valid, prediction.probabilities, 0)
    return Prediction(labels, probabilities)


def label_picture(labels: np.ndarray, colors: list[list[int]]) -> Image.Image:
    picture = Image.fromarray(labels)
    picture.putpalette([value for color in colors for value in color])  # makes it a 'P' image
    return picture


def probability_picture(probabilities: np.ndarray) -> Image.Image:
    # float64 before rounding: float32 products would misround some of the 65,536 levels.
    return Image.fromarray(np.rint(probabilities.astype(np.float64) * PROBABILITY_LEVELS).astype(np.uint16))


def overlay_picture(image: np.ndarray, labels: np.ndarray, valid: np.ndarray | None, colors) -> Image.Image:
    picture = to_rgb(image)
    if valid is not None:  # dimmed in floating point, as render dims, before overlay rounds once
        picture = picture.astype(np.float32)
        picture[~valid] *= BACKGROUND_DIM
    return Image.fromarray(overlay(picture, labels, colors, OVERLAY_ALPHA))


def save(picture: Image.Image, path: Path) -> None:
    options = {"format": "JPEG", "quality": JPEG_QUALITY} if path.suffix == ".jpg" else {"format": "PNG"}
    with atomic_path(path) as tmp:
        picture.save(tmp, **options)


def write_outputs(job: Job, prediction: Prediction, meta: DatasetMeta, out: Path, overlay_format: str) -> None:
    stem = job.path.stem
    save(label_picture(prediction.labels, meta.colors), out / f"{stem}.png")
    if prediction.probabilities is not None:
        save(probability_picture(prediction.probabilities), out / f"{stem}_prob.png")
    picture = overlay_picture(job.image, prediction.labels, job.valid, meta.colors)
    save(picture, out / f"{stem}_overlay.{overlay_format}")


# ------------------------------------------------------------------------------------------ the run


class Run:
    """One invocation's images: batching consecutive ones of one size, writing, progress, and the tally."""

    def __init__(self, dataset: str, predictor: Predictor, out: Path, total: int):
        self.dataset, self.predictor, self.out = dataset, predictor, out
        self.options = predictor.options
        self.pending: list[Job] = []
        self.done = self.failed = self.pixels = 0
        # disable=None: drawn on a terminal only, so logs and pipes get the summary line alone.
        self.bar = tqdm(total=total, desc=f"predict {dataset}", unit="image", file=sys.stderr, disable=None)

    def fail(self, message: str) -> None:
        tqdm.write(f"predict {self.dataset}: error: {message}", file=sys.stderr)
        self.failed += 1
        self.bar.update()

    def submit(self, job: Job) -> None:
        h, w = job.pixels.shape[:2]
        if max(h, w) > self.options.max_side:
            self.flush()  # outputs stay in input order
            self.finish(job, self.predictor.tiled(job.pixels))
            return
        if self.pending and not self.joins_batch(h, w):
            self.flush()
        self.pending.append(job)
        if len(self.pending) == self.options.batch_size:
            self.flush()

    def joins_batch(self, h: int, w: int) -> bool:
        return (
            self.pending[0].pixels.shape[:2] == (h, w)
            and len(self.pending) < self.options.batch_size
            and (len(self.pending) + 1) * h * w <= self.options.max_side**2
        )

    def flush(self) -> None:
        if self.pending:
            batch = np.stack([job.pixels for job in self.pending])
            for job, prediction in zip(self.pending, self.predictor.batch(batch)):
                self.finish(job, prediction)
            self.pending = []

    def finish(self, job: Job, prediction: Prediction) -> None:
        size = job.image.shape[:2]
        prediction = masked(to_input_size(prediction, size), job.valid)
        try:
            write_outputs(job, prediction, self.predictor.meta, self.out, self.options.overlay_format)
        except StageError as e:  # this output cannot be written (a name too long, a full disk): say so, go on
            self.fail(str(e))
            return
        self.done += 1
        self.pixels += size[0] * size[1]
        self.bar.update()

    def close(self) -> None:
        self.flush()
        self.bar.close()


def summary_line(dataset: str, run: Run, seconds: float, out: Path) -> str:
    seconds = max(seconds, 1e-9)
    line = (
        f"predict {dataset}: {run.done} images in {seconds:.1f} s ({run.done / seconds:.2f} images/s, "
        f"{run.pixels / 1e6 / seconds:.2f} Mpixel/s) -> {out}"
    )
    return line + (f", {run.failed} failed" if run.failed else "")


def predict(args: argparse.Namespace) -> int:
    model_path = DatasetPaths(args.dataset).model
    # params.yaml first: a bad value fails before the model is loaded.
    evaluate = load_params(args.dataset, "evaluate", EvaluateParams)
    scale = params_scale(args.dataset) if args.scale is None else args.scale
    device = setup(seed=0, threads=args.threads)
    model, meta = load_checkpoint(model_path, device)
    channels = input_channels(model, model_path)
    if meta.num_classes > 256:
        raise StageError(f"{model_path}: {meta.num_classes} classes; an indexed PNG holds at most 256")
    options = resolve_options(args, evaluate, scale, model.size_multiple)
    inputs = claim_outputs(list_inputs(args.inputs, args.out), meta, options.overlay_format)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(f"{args.out}: cannot create the output directory ({e.strerror or e})") from None

    started = time.perf_counter()
    run = Run(args.dataset, Predictor(model, meta, device, options), args.out, len(inputs))
    for path, problem in inputs:
        if problem is not None:
            run.fail(f"{path}: {problem}")
            continue
        try:
            job = read_job(path, channels, options)
        except StageError as e:
            run.fail(str(e))
            continue
        run.submit(job)
    run.close()
    print(summary_line(args.dataset, run, time.perf_counter() - started, args.out), flush=True)
    return 1 if run.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return predict(args)
    except StageError as e:
        print(f"predict {shown_name(args.dataset)}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
