"""Scoring a model on a prepared split, as evaluate reports it: the headline, the detail and the curves.

Accumulated batch by batch, only pixels inside the field of view counted. Design: docs/inference.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.atomic import atomic_path
from pipeline.confusion import ConfusionMatrix, binary_metrics
from pipeline.inference import logits_to_labels, predict_batches
from pipeline.metrics import ProbabilityCounts, downsample_curve
from pipeline.prepared import PreparedDataError, open_split
from pipeline.shapes import NSD_TOLERANCE_PX, ShapeScores
from pipeline.tasks import TASKS

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


def predict_split(model, split, batch_size: int, device, tta: str):
    """``(indices, samples, logits)`` per batch of consecutive samples of one size."""
    for indices, samples in split.batches(batch_size, ("image", "mask", "fov")):
        images = np.stack([sample.image for sample in samples])
        ((_, logits),) = predict_batches(model, images, len(samples), device, tta)
        yield indices, samples, logits


def check_scored(split, pixels: int) -> None:
    if not pixels:  # known only once the split is read
        raise PreparedDataError(
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


def detail_of(confusion: ConfusionMatrix, shapes: ShapeScores, classes: list[str], scores: dict, **more) -> dict:
    """evaluation.json's content: per class, ``more``, every score and the confusion matrix."""
    per_class = confusion.summary(classes)["per_class"]
    boundaries = shapes.class_scores()
    none = {"hd95": None, "nsd": None}  # background: every record has the same keys, as DVC's plots want
    records = [{"class": name, **s, **boundaries.get(c, none)} for c, (name, s) in enumerate(per_class.items())]
    matrix = {"classes": classes, "matrix": confusion.matrix.tolist()}
    return {"classes": records, **more, "scores": scores, "confusion": matrix}


def evaluate_multiclass(model, meta, test, batch_size: int, device, tta: str = "none"):
    """``(headline, detail, foreground probability counts)``."""
    confusion = ConfusionMatrix(meta.num_classes)
    foreground = ProbabilityCounts()  # any class but background, against background
    shapes = ShapeScores(meta.num_classes, topology=False)
    for _, samples, logits in predict_split(model, test, batch_size, device, tta):
        masks = np.stack([sample.mask for sample in samples])
        fov = np.stack([sample.fov for sample in samples]) if test.has_fov else None
        labels = logits_to_labels(logits)
        confusion.update(masks, labels, fov)
        foreground.update(TASKS["multiclass"].foreground(logits), torch.from_numpy(masks > 0).long(), fov)
        for sample, predicted in zip(samples, labels.numpy()):
            shapes.update(sample.mask, predicted, sample.fov)
    check_scored(test, int(confusion.matrix.sum()))
    summary = confusion.summary(meta.classes)
    headline = {key: summary[key] for key in ("dice", "iou", "tp", "fp", "fn")}
    shape_scores = shapes.summary()
    headline.update(roc_auc=foreground.roc_auc(), pr_auc=foreground.average_precision())
    scores = {**headline, **shape_scores, "accuracy": summary["accuracy"], "mean_iou": summary["mean_iou"]}
    scores.update(nsd_tolerance_px=NSD_TOLERANCE_PX, images=len(test), tta=tta)
    return headline, detail_of(confusion, shapes, meta.classes, scores), foreground


def image_probability_counts(model, split, batch_size: int, device, tta: str):
    """``(index, sample, probabilities, counts of its FOV pixels' probabilities)`` per image of ``split``."""
    for indices, samples, logits in predict_split(model, split, batch_size, device, tta):
        probs = TASKS["binary"].foreground(logits)
        for offset, (i, sample) in enumerate(zip(indices, samples)):
            counts = ProbabilityCounts()
            counts.update(probs[offset], sample.mask, sample.fov)
            yield i, sample, probs[offset], counts


def dice_named(scores: dict) -> dict:
    """Without F1, which is Dice under another name."""
    return {key: value for key, value in scores.items() if key != "f1"}


def training_threshold(model, train, batch_size: int, device, tta: str) -> float:
    """The threshold that maximises Dice on the *training* images (never on test: the Dice at it stays honest)."""
    train_pixels = ProbabilityCounts()
    for _, _, _, counts in image_probability_counts(model, train, batch_size, device, tta):
        train_pixels += counts
    check_scored(train, len(train_pixels.values))
    return train_pixels.best_f1_threshold()[0]


def human_scores(test) -> dict:
    """The second annotator, scored image by image as if it were a model: the human level."""
    human = ConfusionMatrix(2)
    for i in range(len(test)):
        sample = test.read(i, ("mask", "fov", "reference"))
        human.update(sample.mask, sample.reference, sample.fov)
    (tn, fp), (fn, tp) = human.matrix.tolist()
    return dice_named(binary_metrics(tp, fp, fn, tn))


def evaluate_binary(model, meta, prepared: Path, test, settings, device):
    """``(headline, detail, test probability counts)`` at ``settings.threshold`` ("train": training_threshold)."""
    batch_size, tta = settings.batch_size, settings.tta
    train_threshold = training_threshold(model, open_split(prepared, "train"), batch_size, device, tta)
    threshold = train_threshold if settings.threshold == "train" else settings.threshold
    test_pixels = ProbabilityCounts()
    shapes = ShapeScores(2, topology=True)
    images = []
    for i, sample, probs, counts in image_probability_counts(model, test, batch_size, device, tta):
        test_pixels += counts
        images.append({"id": test.ids[i], **dice_named(counts.summary(threshold))})
        predicted = probs.numpy().astype(np.float64) > threshold  # as the counts compare: in float64
        shapes.update(sample.mask, predicted.astype(np.uint8), sample.fov)
    check_scored(test, len(test_pixels.values))
    per_image = pd.DataFrame(images)[PER_IMAGE_SCORES].astype(float)  # None (undefined) -> NaN, skipped

    at_threshold = dice_named(test_pixels.summary(threshold))
    headline = {key: at_threshold[key] for key in ("dice", "iou", "tp", "fp", "fn", "roc_auc", "pr_auc")}
    shape_scores = shapes.summary()
    scores = {
        **at_threshold,
        **shape_scores,
        "nsd_tolerance_px": NSD_TOLERANCE_PX,
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
    # Keyed by id, not a list: DVC draws evaluation.json's per-class bars from the file's lists of records, and
    # merges every such list index by index.
    by_id = {record.pop("id"): record for record in images}
    return headline, detail_of(confusion, shapes, meta.classes, scores, images=by_id), test_pixels


def score_multiclass(model, meta, prepared: Path, test, settings, device):
    return evaluate_multiclass(model, meta, test, settings.batch_size, device, settings.tta)


# What evaluate runs for each task: (model, meta, prepared directory, test split, EvaluateParams, device).
SCORERS = {"multiclass": score_multiclass, "binary": evaluate_binary}
