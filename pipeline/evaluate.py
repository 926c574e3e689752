"""Score the trained model on the test split: ``python -m pipeline.evaluate <dataset>``.

Writes, for ``dvc metrics`` and ``dvc plots``:

* ``metrics/<dataset>/eval.json``, the headline a user compares across experiments, the same keys for every
  task so that ``dvc metrics show`` stays narrow: foreground ``dice`` (= F1 for a binary task), ``iou``,
  ``tp`` / ``fp`` / ``fn``, ``roc_auc`` and ``pr_auc`` (average precision) of foreground against background;
  a binary task adds ``human_dice`` (the second annotator scored like the model) and ``train_threshold``
  (the threshold that maximises Dice on the *training* images, reported beside the operating threshold).
* ``metrics/<dataset>/evaluation.json``, the detail: ``classes`` (one record per class: TP, FP, FN, IoU, Dice;
  drawn by ``dvc plots`` as a bar chart), ``images`` (binary tasks: one record per test image), ``scores``
  (every score: pixel accuracy, mean IoU, sensitivity, specificity, per-image mean and standard deviation,
  Dice at the training threshold, the second annotator's scores, the threshold used) and ``confusion``
  (rows = true class, columns = predicted), which render reads.
* ``metrics/<dataset>/roc.csv`` and ``pr.csv``: ROC and precision-recall curves of foreground against
  background (binary: the vessel probability; multiclass: one minus the background probability).

A binary model's pixel is positive when its probability is above ``<dataset>.evaluate.threshold`` (0.5 by
default): a branch can move the operating point, and the metrics with it, without retraining. Only pixels
inside the split's field of view (``fov``) count, when it has one.

The splits are read from the prepared shards batch by batch (``PreparedSplit.batches``: consecutive images of
one size, at most ``batch_size`` of them, stacked), and predictions are accumulated as they come (a confusion
matrix, and the exact probability counts of pipeline.metrics): what evaluate holds at once is one batch, never a
split. Each image is predicted at its own size; a split of one image size is predicted in the same batches as
``predict_batches`` over the whole split would, so its scores do not depend on how it is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.atomic import atomic_path, write_json
from pipeline.checkpoint import check_input_channels, load_model
from pipeline.confusion import ConfusionMatrix, binary_metrics
from pipeline.inference import TTA, logits_to_labels, predict_batches
from pipeline.metrics import ProbabilityCounts, downsample_curve
from pipeline.params import load_params, require
from pipeline.prepared import DatasetMeta, PreparedDataError, PreparedSplit, Sample, open_split
from pipeline.runtime import setup
from pipeline.stage import DatasetPaths, run

PER_IMAGE_SCORES = ["dice", "iou", "sensitivity", "specificity", "accuracy", "roc_auc"]
CURVE_POINTS = 500  # rows per ROC / PR CSV: plenty for a plot, small for git


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    # A binary task's operating point: a pixel is positive when its probability is above it. Render draws at
    # the same threshold (it reads it from evaluation.json). Multiclass tasks take the most probable class.
    threshold: float = 0.5
    # Test-time augmentation (pipeline.inference.TTA): "none", "flips" or "dihedral" (flips and quarter turns),
    # probabilities averaged over the views. Only symmetries the training augmentation taught the model pay:
    # STARE's vessels have no orientation, MNIST's digits do (a 6 turned is a 9). Render and predict use the
    # same setting, so pictures and predictions agree with the metrics.
    tta: str = "none"

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(0 < self.threshold < 1, f"{key}.threshold", f"must be in (0, 1), got {self.threshold}")
        require(self.tta in TTA, f"{key}.tta", f"must be one of {list(TTA)}, got {self.tta!r}")


def rounded(value):
    """JSON-ready: floats rounded to 6 digits, NaN (a pandas std of one image) as null."""
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float):
        return round(float(value), 6) if math.isfinite(value) else None
    return value


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def class_records(confusion: ConfusionMatrix, classes: list[str]) -> list[dict]:
    per_class = confusion.summary(classes)["per_class"]
    return [{"class": name, **scores} for name, scores in per_class.items()]


def predict_split(
    model: nn.Module, split: PreparedSplit, batch_size: int, device, tta: str = "none"
) -> Iterator[tuple[list[int], list[Sample], torch.Tensor]]:
    """``(indices, samples, logits)`` for each batch of ``split``: consecutive samples of one size, at most
    ``batch_size`` of them, read (image, mask, field of view) and predicted as one stacked batch; logits as
    predict_batches gives them, float32 (B, K, H, W) on the CPU, at the images' own size.

    Only one batch is in memory at a time. On a split of one image size the batches are those of
    ``predict_batches`` over the whole split (runs of ``batch_size`` from the first image), so the logits are too.
    """
    for indices, samples in split.batches(batch_size, ("image", "mask", "fov")):
        ((_, logits),) = predict_batches(
            model, np.stack([sample.image for sample in samples]), len(samples), device, tta
        )
        yield indices, samples, logits


def no_valid_pixel(split: PreparedSplit) -> PreparedDataError:
    """A split whose field of view is false everywhere: nothing to score (known only once it has been read)."""
    return PreparedDataError(
        f"{split.where}: no pixel of its {len(split)} images is valid (its fov is all false); "
        "nothing to train on or score"
    )


# ------------------------------------------------------------------------------------------ multiclass


def evaluate_multiclass(
    model: nn.Module, meta: DatasetMeta, test: PreparedSplit, batch_size: int, device, tta: str = "none"
) -> tuple[dict, dict, ProbabilityCounts]:
    """``(headline, detail, foreground probability counts)``."""
    confusion = ConfusionMatrix(meta.num_classes)
    foreground = ProbabilityCounts()
    for _, samples, logits in predict_split(model, test, batch_size, device, tta):
        masks = np.stack([sample.mask for sample in samples])
        fov = np.stack([sample.fov for sample in samples]) if test.has_fov else None
        confusion.update(masks, logits_to_labels(logits), fov)
        # Any class but background, against background: the probability of "some foreground class".
        foreground.update(1 - torch.softmax(logits, dim=1)[:, 0], torch.from_numpy(masks > 0).long(), fov)
    if int(confusion.matrix.sum()) == 0:
        raise no_valid_pixel(test)
    summary = confusion.summary(meta.classes)
    headline = {key: summary[key] for key in ("dice", "iou", "tp", "fp", "fn")}
    headline.update(roc_auc=foreground.roc_auc(), pr_auc=foreground.average_precision())
    scores = {
        **headline,
        "accuracy": summary["accuracy"],
        "mean_iou": summary["mean_iou"],
        "images": len(test),
        "tta": tta,
    }
    return (
        headline,
        {
            "classes": class_records(confusion, meta.classes),
            "scores": scores,
            "confusion": {"classes": meta.classes, "matrix": confusion.matrix.tolist()},
        },
        foreground,
    )


# ------------------------------------------------------------------------------------------ binary


def image_probability_counts(
    model: nn.Module, split: PreparedSplit, batch_size: int, device, tta: str = "none"
) -> Iterator[tuple[int, ProbabilityCounts]]:
    """``(image index, counts of its FOV pixels' probabilities)`` for every image of ``split``, in order."""
    for indices, samples, logits in predict_split(model, split, batch_size, device, tta):
        probs = torch.sigmoid(logits[:, 0])
        for offset, (i, sample) in enumerate(zip(indices, samples)):
            counts = ProbabilityCounts()
            counts.update(probs[offset], sample.mask, sample.fov)
            yield i, counts


def dice_named(scores: dict) -> dict:
    """binary_metrics' scores with F1 under its segmentation name only (the two are the same number)."""
    return {key: value for key, value in scores.items() if key != "f1"}


def evaluate_binary(
    model: nn.Module,
    meta: DatasetMeta,
    train: PreparedSplit,
    test: PreparedSplit,
    batch_size: int,
    threshold: float,
    device,
    tta: str = "none",
) -> tuple[dict, dict, ProbabilityCounts]:
    """``(headline, detail, test probability counts)``."""
    # The threshold is chosen on the training images, never on test, so the Dice reported at it is honest. Only
    # the counts of distinct probabilities are kept, never the images: the training split streams through too.
    train_pixels = ProbabilityCounts()
    for _, counts in image_probability_counts(model, train, batch_size, device, tta):
        train_pixels += counts
    if not len(train_pixels.values):
        raise no_valid_pixel(train)
    train_threshold, _ = train_pixels.best_f1_threshold()

    test_pixels = ProbabilityCounts()
    images = []
    for i, counts in image_probability_counts(model, test, batch_size, device, tta):
        test_pixels += counts
        images.append({"id": test.ids[i], **dice_named(counts.summary(threshold))})
    if not len(test_pixels.values):
        raise no_valid_pixel(test)
    per_image = pd.DataFrame(images)[PER_IMAGE_SCORES].astype(float)  # None (undefined) -> NaN, skipped

    at_threshold = dice_named(test_pixels.summary(threshold))
    headline = {key: at_threshold[key] for key in ("dice", "iou", "tp", "fp", "fn", "roc_auc", "pr_auc")}
    scores = {
        **at_threshold,
        "threshold": threshold,
        "tta": tta,
        "per_image_mean": per_image.mean().to_dict(),
        "per_image_std": per_image.std().to_dict(),  # sample standard deviation (ddof=1) over images
        "train_threshold": train_threshold,
        "dice_at_train_threshold": binary_metrics(*test_pixels.counts_at(train_threshold))["dice"],
        "images": len(test),
    }
    if test.has_reference:
        # The second annotator, scored as if it were a model: the human level to compare the model with. Image
        # by image, without the photos: the counts are integers, so they add up to the same matrix as one pass.
        human = ConfusionMatrix(2)
        for i in range(len(test)):
            sample = test.read(i, ("mask", "fov", "reference"))
            human.update(sample.mask, sample.reference, sample.fov)
        (tn, fp), (fn, tp) = human.matrix.tolist()
        scores["human"] = dice_named(binary_metrics(tp, fp, fn, tn))
        headline["human_dice"] = scores["human"]["dice"]
    headline["train_threshold"] = train_threshold

    tp, fp, fn, tn = test_pixels.counts_at(threshold)
    confusion = ConfusionMatrix(2)
    confusion.matrix = torch.tensor([[tn, fp], [fn, tp]])
    return (
        headline,
        {
            "classes": class_records(confusion, meta.classes),
            "images": images,
            "scores": scores,
            "confusion": {"classes": meta.classes, "matrix": [[tn, fp], [fn, tp]]},
        },
        test_pixels,
    )


# ------------------------------------------------------------------------------------------ stage


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.round(6).to_csv(tmp, index=False)


def evaluate(dataset: str) -> dict:
    """Score ``data/models/<dataset>/model.pt`` on the test split; write the outputs, return the headline."""
    paths = DatasetPaths(dataset)
    settings = load_params(dataset, "evaluate", EvaluateParams)
    device = setup(0)
    model, meta = load_model(paths, device)
    test = open_split(paths.prepared, "test")
    check_input_channels(model, paths.model, test.channels, test.where)
    if meta.task == "binary":
        train = open_split(paths.prepared, "train")
        headline, detail, pixels = evaluate_binary(
            model, meta, train, test, settings.batch_size, settings.threshold, device, settings.tta
        )
    else:
        headline, detail, pixels = evaluate_multiclass(model, meta, test, settings.batch_size, device, settings.tta)
    fpr, tpr = downsample_curve(*pixels.roc_curve(), CURVE_POINTS)
    write_csv(paths.metrics / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
    recall, precision = downsample_curve(*pixels.pr_curve(), CURVE_POINTS)
    write_csv(paths.metrics / "pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))
    write_json(paths.evaluation, rounded(detail))
    headline = rounded(headline)
    write_json(paths.metrics / "eval.json", headline)  # last: the headline appears only when all else is written
    return headline


def summary_line(dataset: str, headline: dict) -> str:
    line = (
        f"Dice {fmt(headline['dice'])}, IoU {fmt(headline['iou'])}, ROC-AUC {fmt(headline['roc_auc'])}, "
        f"PR-AUC {fmt(headline['pr_auc'])}"
    )
    if "train_threshold" in headline:
        line += f"; the training images' best threshold {headline['train_threshold']}"
    if "human_dice" in headline:
        line += f"; second annotator Dice {fmt(headline['human_dice'])}"
    return f"evaluate {dataset}: {line} -> {DatasetPaths(dataset).metrics / 'eval.json'}"


def evaluate_stage(dataset: str) -> str:
    return summary_line(dataset, evaluate(dataset))


if __name__ == "__main__":
    run(evaluate_stage)
