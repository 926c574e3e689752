"""Segmenting image files with a model file: what ``python -m pipeline.predict`` runs.

Each input is read as prepare reads a folder dataset's images (pipeline/images.py), resized by the plan's
scale, predicted whole (consecutive inputs of one size batched) or, beyond ``max_side``, in overlapping tiles,
brought back to its own size and written atomically: an indexed label PNG, a 16-bit probability PNG (binary
tasks) and an overlay. An input that cannot be read or written is one line on stderr; the others go on and
the exit status is 1. Formats, tiling and the operating point: docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.transform import resize as resize_to_shape
from tqdm import tqdm

from pipeline.checkpoint import Evaluation, load_model_file, release_path
from pipeline.images import IMAGE_SUFFIXES, decode_valid, open_file, read_image, resize
from pipeline.inference import Prediction, Predictor
from pipeline.prepared import DatasetMeta
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, StageError
from pipeline.viz import label_picture, overlay_picture, probability_picture, save


@dataclass(frozen=True)
class Options:
    """What the model file and the command line decide; tile and overlap already rounded to the model's multiple."""

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


def resolve_options(args: argparse.Namespace, evaluation: Evaluation, scale: float, multiple: int) -> Options:
    """The command line's values over the model file's; tile and overlap rounded to the model's ``multiple``."""
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
        threshold=evaluation.threshold if args.threshold is None else args.threshold,
        tta=evaluation.tta if args.tta is None else args.tta,
        batch_size=evaluation.batch_size if args.batch_size is None else args.batch_size,
        scale=scale if args.scale is None else args.scale,
        max_side=args.max_side,
        tile=tile,
        overlap=overlap,
        valid=args.valid,
        overlay_format=args.overlay_format,
    )


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


# ------------------------------------------------------------------------------------------ outputs


def to_input_size(prediction: Prediction, size: tuple[int, int]) -> Prediction:
    """Undo the scale: labels by nearest neighbour, probabilities bilinearly, to exactly the input's size.

    images.resize takes a factor, and ``round(round(h * s) / s)`` need not give ``h`` back; skimage's resize,
    which it calls, takes the shape.
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

    def __init__(self, label: str, predictor: Predictor, meta: DatasetMeta, options: Options, out: Path, total: int):
        self.label, self.predictor, self.meta, self.options, self.out = label, predictor, meta, options, out
        self.pending: list[Job] = []
        self.done = self.failed = self.pixels = 0
        # disable=None: drawn on a terminal only, so logs and pipes get the summary line alone.
        self.bar = tqdm(total=total, desc=label, unit="image", file=sys.stderr, disable=None)

    def fail(self, message: str) -> None:
        tqdm.write(f"{self.label}: error: {message}", file=sys.stderr)
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
            write_outputs(job, prediction, self.meta, self.out, self.options.overlay_format)
        except StageError as e:  # this output cannot be written (a name too long, a full disk): say so, go on
            self.fail(str(e))
            return
        self.done += 1
        self.pixels += size[0] * size[1]
        self.bar.update()

    def close(self) -> None:
        self.flush()
        self.bar.close()

    def summary_line(self, seconds: float) -> str:
        seconds = max(seconds, 1e-9)
        line = (
            f"{self.label}: {self.done} images in {seconds:.1f} s ({self.done / seconds:.2f} images/s, "
            f"{self.pixels / 1e6 / seconds:.2f} Mpixel/s) -> {self.out}"
        )
        return line + (f", {self.failed} failed" if self.failed else "")


# ------------------------------------------------------------------------------------------ the command


def model_path(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The model file to run and the stage that wrote it: ``--model``'s (any writer), else the dataset's release,
    else, before evaluate has run, train's checkpoint."""
    if args.model is not None:
        return args.model, None
    paths = DatasetPaths(args.dataset)
    release = release_path(paths)
    return (release, "evaluate") if release.exists() else (paths.model, "train")


def predict_files(args: argparse.Namespace, label: str) -> int:
    """Run predict's command line ``args``; ``label`` starts every line it prints. The exit status."""
    path, writer = model_path(args)
    device = setup(seed=0, threads=args.threads)
    model_file = load_model_file(path, writer)
    model = model_file.build(device)
    plan, meta = model_file.plan, model_file.plan.meta
    if plan.input_channels not in (1, 3):
        raise StageError(
            f"{path}: the model reads {plan.input_channels}-channel images; predict reads gray (1) or RGB (3)"
        )
    if meta.num_classes > 256:
        raise StageError(f"{path}: {meta.num_classes} classes; an indexed PNG holds at most 256")
    options = resolve_options(args, model_file.evaluation or Evaluation(), meta.scale, model.size_multiple)
    inputs = claim_outputs(list_inputs(args.inputs, args.out), meta, options.overlay_format)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(f"{args.out}: cannot create the output directory ({e.strerror or e})") from None

    started = time.perf_counter()
    binary = meta.task == "binary"
    predictor = Predictor(model, binary, device, options.threshold, options.tta, options.tile, options.overlap)
    run = Run(label, predictor, meta, options, args.out, len(inputs))
    for input_path, problem in inputs:
        if problem is not None:
            run.fail(f"{input_path}: {problem}")
            continue
        try:
            job = read_job(input_path, plan.input_channels, options)
        except StageError as e:
            run.fail(str(e))
            continue
        run.submit(job)
    run.close()
    print(run.summary_line(time.perf_counter() - started), flush=True)
    return 1 if run.failed else 0
