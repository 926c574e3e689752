"""Counting a segmentation's outcomes: the confusion matrix every class-wise score derives from.

As in torchvision's ``references/segmentation/utils.py``: rows are the true class, columns the predicted one,
accumulated batch by batch. Train scores its validation split with it, evaluate its test split; the
threshold-free binary scores (ROC, precision-recall) are in pipeline.metrics, which evaluate alone runs.

A metric whose denominator is zero (IoU of a class absent from both target and prediction, specificity of
an image without negatives) is ``None``: JSON has no NaN, and 0 would read as "all wrong".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def flat_valid(target, pred, valid_mask) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(target).reshape(-1).long()
    pred = torch.as_tensor(pred).reshape(-1)
    if target.shape != pred.shape:
        raise ValueError(f"target has {target.numel()} values but prediction has {pred.numel()}")
    if valid_mask is not None:
        keep = torch.as_tensor(valid_mask).reshape(-1).bool()
        target, pred = target[keep], pred[keep]
    return target, pred


# ------------------------------------------------------------------------------------------ multiclass


# A class's scores from its one-vs-rest counts (tp, fp, fn), by name: each is a column of evaluation.json's
# per-class records and of its "per class" plot. Adding one is a function and a line here (README, "Extend it").
CLASS_SCORES: dict[str, Callable[[int, int, int], float | None]] = {
    "iou": lambda tp, fp, fn: ratio(tp, tp + fp + fn),
    "dice": lambda tp, fp, fn: ratio(2 * tp, 2 * tp + fp + fn),
}


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (int64)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, target, pred, valid_mask=None) -> None:
        """Add a batch of label maps (any matching shapes); pixels where ``valid_mask`` is false are skipped."""
        target, pred = flat_valid(target, pred, valid_mask)
        pred = pred.long()
        n = self.num_classes
        if target.numel() and (min(target.min(), pred.min()) < 0 or max(target.max(), pred.max()) >= n):
            raise ValueError(f"class indices must be in [0, {n})")
        # One bincount over t * n + p fills the whole matrix at once.
        self.matrix += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def per_class_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN of each class, one-vs-rest."""
        m = self.matrix.numpy()
        tp = np.diag(m)
        return tp, m.sum(axis=0) - tp, m.sum(axis=1) - tp

    def foreground_counts(self) -> tuple[int, int, int]:
        """TP, FP, FN summed over classes 1..K-1 (class 0 is background).

        A pixel given the wrong digit is one FP (for the predicted class) and one FN (for the true one);
        background predicted as a digit is only an FP, a digit predicted as background only an FN.
        """
        tp, fp, fn = self.per_class_counts()
        return int(tp[1:].sum()), int(fp[1:].sum()), int(fn[1:].sum())

    def summary(self, class_names: list[str]) -> dict:
        """Foreground TP/FP/FN/IoU/Dice, pixel accuracy, mean IoU and per-class counts and scores.

        ``mean_iou`` averages the IoU of every class (background included, as torchvision does) that occurs
        in the target or the prediction; an absent class has no IoU rather than a perfect or a zero one.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        tp, fp, fn = self.foreground_counts()
        per_tp, per_fp, per_fn = self.per_class_counts()
        per_class = {}
        for name, t, p, n in zip(class_names, per_tp.tolist(), per_fp.tolist(), per_fn.tolist()):
            per_class[name] = {
                "tp": t,
                "fp": p,
                "fn": n,
                **{key: score(t, p, n) for key, score in CLASS_SCORES.items()},
            }
        ious = [c["iou"] for c in per_class.values() if c["iou"] is not None]
        total = int(self.matrix.sum())
        return {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "iou": ratio(tp, tp + fp + fn),
            "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "accuracy": ratio(int(self.matrix.trace()), total),
            "mean_iou": float(np.mean(ious)) if ious else None,
            "per_class": per_class,
        }


def binary_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """The counts and the scores derived from them; F1 and Dice are the same number."""
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "f1": f1,
        "dice": f1,
        "iou": ratio(tp, tp + fp + fn),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "accuracy": ratio(tp + tn, tp + fp + fn + tn),
    }
