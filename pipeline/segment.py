"""Segmenting image files with a model file: what ``python -m pipeline.predict`` runs.

Inputs, sizes, tiles, validity masks and errors: docs/inference.md, "predict".
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
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, StageError
from pipeline.tasks import TASKS
from pipeline.viz import label_picture, overlay_picture, probability_picture, save


@dataclass
class Job:
    path: Path
    image: np.ndarray  # uint8 (H, W, C) as read: the overlay's base
    valid: np.ndarray | None  # bool (H, W)
    pixels: np.ndarray  # uint8 (h, w, C): the image resized by the scale, what the model sees


def resolve_options(args: argparse.Namespace, evaluation: Evaluation, scale: float, multiple: int):
    """``args`` with the model file's values where the command line gave none, the tile rounded down to the model's
    ``multiple`` (memory stays within what was asked) and the overlap up."""
    tile = max(multiple, args.tile // multiple * multiple)
    overlap = -(-args.overlap // multiple) * multiple
    if tile - 2 * overlap < multiple:
        raise StageError(
            f"--tile {args.tile} leaves no centre inside --overlap {args.overlap} on both sides "
            f"(rounded to the model's multiple {multiple}: tile {tile}, overlap {overlap}); "
            f"the tile must be at least 2 x overlap + {multiple}"
        )
    defaults = {"threshold": evaluation.threshold, "tta": evaluation.tta, "batch_size": evaluation.batch_size}
    given = {name: getattr(args, name) for name in [*defaults, "scale"] if getattr(args, name) is not None}
    return argparse.Namespace(**{**vars(args), **defaults, "scale": scale, **given, "tile": tile, "overlap": overlap})


def list_inputs(arguments: list[Path], out: Path) -> list[tuple[Path, str | None]]:
    """``(file, None)`` per image to run, ``(path, what is wrong)`` per argument that gives none; a directory gives
    its image files, recursively and sorted, but not hidden ones nor any under ``out`` (a rerun's outputs)."""
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
        else:
            inputs.append((argument, None if argument.exists() else "no such file or directory"))
    return inputs


def claim_outputs(inputs: list[tuple[Path, str | None]], meta, overlay_format: str) -> list[tuple[Path, str | None]]:
    """The inputs, with an error for each one whose output names an earlier input already has (same stem)."""
    owners: dict[str, Path] = {}
    claimed = []
    for path, problem in inputs:
        if problem is None:
            names = TASKS[meta.task].output_names(path.stem, overlay_format)
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


def to_input_size(prediction: Prediction, size: tuple[int, int], valid: np.ndarray | None) -> Prediction:
    """Back to exactly ``size`` (labels: nearest neighbour, probabilities: bilinear); background outside ``valid``."""
    labels, probabilities = prediction.labels, prediction.probabilities
    if labels.shape != size:
        labels = resize_to_shape(labels, size, order=0, preserve_range=True, anti_aliasing=False).astype(np.uint8)
        if probabilities is not None:
            shrinking = size[0] < probabilities.shape[0]
            probabilities = resize_to_shape(probabilities, size, order=1, preserve_range=True, anti_aliasing=shrinking)
            probabilities = probabilities.astype(np.float32)
    if valid is not None:
        labels = np.where(valid, labels, 0).astype(np.uint8)
        probabilities = None if probabilities is None else np.where(valid, probabilities, 0)
    return Prediction(labels, probabilities)


def write_outputs(job: Job, prediction: Prediction, meta, out: Path, overlay_format: str) -> None:
    stem = job.path.stem
    save(label_picture(prediction.labels, meta.colors), out / f"{stem}.png")
    if prediction.probabilities is not None:
        save(probability_picture(prediction.probabilities), out / f"{stem}_prob.png")
    picture = overlay_picture(job.image, prediction.labels, job.valid, meta.colors)
    save(picture, out / f"{stem}_overlay.{overlay_format}")


class Run:
    """One invocation's images: batching consecutive ones of one size, writing, progress, and the tally."""

    def __init__(self, label: str, predictor: Predictor, meta, options: argparse.Namespace, out: Path, total: int):
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
        if self.pending and (
            self.pending[0].pixels.shape[:2] != (h, w) or (len(self.pending) + 1) * h * w > self.options.max_side**2
        ):
            self.flush()
        self.pending.append(job)
        if len(self.pending) == self.options.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            batch = np.stack([job.pixels for job in self.pending])
            for job, prediction in zip(self.pending, self.predictor.batch(batch)):
                self.finish(job, prediction)
            self.pending = []

    def finish(self, job: Job, prediction: Prediction) -> None:
        size = job.image.shape[:2]
        prediction = to_input_size(prediction, size, job.valid)
        try:
            write_outputs(job, prediction, self.meta, self.out, self.options.overlay_format)
        except StageError as e:  # this output cannot be written (a name too long, a full disk): say so, go on
            self.fail(str(e))
            return
        self.done += 1
        self.pixels += size[0] * size[1]
        self.bar.update()

    def summary_line(self, seconds: float) -> str:
        seconds = max(seconds, 1e-9)
        line = (
            f"{self.label}: {self.done} images in {seconds:.1f} s ({self.done / seconds:.2f} images/s, "
            f"{self.pixels / 1e6 / seconds:.2f} Mpixel/s) -> {self.out}"
        )
        return line + (f", {self.failed} failed" if self.failed else "")


def model_path(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The model file and the stage that wrote it: ``--model``'s, else the dataset's release, else train's."""
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
    binary = TASKS[meta.task].probability_map
    predictor = Predictor(model, binary, device, options.threshold, options.tta, options.tile, options.overlap)
    run = Run(label, predictor, meta, options, args.out, len(inputs))
    for input_path, problem in inputs:
        if problem is not None:
            run.fail(f"{input_path}: {problem}")
            continue
        try:  # lazily: a device, a pipe or a huge file is refused before it is read
            image = read_image(input_path, str(input_path), plan.input_channels)
            valid = None if options.valid is None else read_valid(input_path, options.valid, image.shape[:2])
        except StageError as e:
            run.fail(str(e))
            continue
        run.submit(Job(input_path, image, valid, resize(image, options.scale, nearest=False)))
    run.flush()
    run.bar.close()
    print(run.summary_line(time.perf_counter() - started), flush=True)
    return 1 if run.failed else 0
