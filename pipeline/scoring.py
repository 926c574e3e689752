"""Scoring a model on a prepared split, as evaluate reports it: the headline, the detail and the curves.

Splits are read batch by batch (consecutive images of one size, at most ``batch_size``) and predictions are
accumulated as they come: a confusion matrix, and the exact probability counts of pipeline.metrics, so that
memory holds one batch, never a split. A binary task's pixel is positive above the operating threshold; its
training images choose the threshold that maximises Dice, reported beside it, and a second annotator, where the
split has one, is scored like the model. Only pixels inside a split's field of view count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.confusion import ConfusionMatrix, binary_metrics
from pipeline.inference import logits_to_labels, predict_batches
from pipeline.metrics import ProbabilityCounts, downsample_curve
from pipeline.prepared import DatasetMeta, PreparedDataError, PreparedSplit, Sample

PER_IMAGE_SCORES = ["dice", "iou", "sensitivity", "specificity", "accuracy", "roc_auc"]
CURVE_POINTS = 500  # rows per ROC / PR CSV: plenty for a plot, small for git


def rounded(value):
    """JSON-ready: floats rounded to 6 digits, NaN (a pandas std of one image) as null."""
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, float):
        return round(float(value), 6) if math.isfinite(value) else None
    return value


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


def write_curves(directory: Path, pixels: ProbabilityCounts) -> None:
    """``roc.csv`` and ``pr.csv`` of foreground against background, at most CURVE_POINTS rows each."""
    fpr, tpr = downsample_curve(*pixels.roc_curve(), CURVE_POINTS)
    recall, precision = downsample_curve(*pixels.pr_curve(), CURVE_POINTS)
    for name, frame in (
        ("roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr})),
        ("pr.csv", pd.DataFrame({"recall": recall, "precision": precision})),
    ):
        with atomic_path(directory / name) as tmp:
            frame.round(6).to_csv(tmp, index=False)


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


def training_threshold(model: nn.Module, train: PreparedSplit, batch_size: int, device, tta: str) -> float:
    """The threshold that maximises Dice on the *training* images, never on test, so that the Dice reported at it
    is honest. Only the counts of distinct probabilities are kept: the training split streams through."""
    train_pixels = ProbabilityCounts()
    for _, counts in image_probability_counts(model, train, batch_size, device, tta):
        train_pixels += counts
    if not len(train_pixels.values):
        raise no_valid_pixel(train)
    return train_pixels.best_f1_threshold()[0]


def human_scores(test: PreparedSplit) -> dict:
    """The second annotator, scored as if it were a model: the human level to compare the model with. Image by
    image, without the photos: the counts are integers, so they add up to the same matrix as one pass."""
    human = ConfusionMatrix(2)
    for i in range(len(test)):
        sample = test.read(i, ("mask", "fov", "reference"))
        human.update(sample.mask, sample.reference, sample.fov)
    (tn, fp), (fn, tp) = human.matrix.tolist()
    return dice_named(binary_metrics(tp, fp, fn, tn))


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
    train_threshold = training_threshold(model, train, batch_size, device, tta)
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
        scores["human"] = human_scores(test)
        headline["human_dice"] = scores["human"]["dice"]
    headline["train_threshold"] = train_threshold

    tp, fp, fn, tn = test_pixels.counts_at(threshold)
    confusion = ConfusionMatrix(2)
    confusion.matrix = torch.tensor([[tn, fp], [fn, tp]])
    detail = {
        "classes": class_records(confusion, meta.classes),
        "images": images,
        "scores": scores,
        "confusion": {"classes": meta.classes, "matrix": [[tn, fp], [fn, tp]]},
    }
    return headline, detail, test_pixels
