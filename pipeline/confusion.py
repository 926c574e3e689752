"""Counting a segmentation's outcomes: the confusion matrix every class-wise score derives from.

Rows are the true class, columns the predicted one (as torchvision's references), accumulated batch by batch.
A score whose denominator is zero is ``None``: JSON has no NaN, and 0 would read as "all wrong".
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


# A class's scores from its one-vs-rest counts (tp, fp, fn), by name: the columns of evaluation.json's per-class
# records and of its "per class" plot. Adding one is a line here (README, "Extend it").
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
        self.matrix += torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)

    def per_class_counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN of each class, one-vs-rest."""
        m = self.matrix.numpy()
        tp = np.diag(m)
        return tp, m.sum(axis=0) - tp, m.sum(axis=1) - tp

    def summary(self, class_names: list[str]) -> dict:
        """Foreground (classes 1..K-1 summed) TP/FP/FN/IoU/Dice, pixel accuracy, mean IoU and per-class scores.

        A pixel given the wrong foreground class is one FP and one FN. ``mean_iou`` averages, as torchvision
        does, the IoU of every class (background included) that occurs in the target or the prediction.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        per_tp, per_fp, per_fn = self.per_class_counts()
        per_class = {
            name: {"tp": t, "fp": p, "fn": n, **{key: score(t, p, n) for key, score in CLASS_SCORES.items()}}
            for name, t, p, n in zip(class_names, per_tp.tolist(), per_fp.tolist(), per_fn.tolist())
        }
        ious = [c["iou"] for c in per_class.values() if c["iou"] is not None]
        tp, fp, fn = int(per_tp[1:].sum()), int(per_fp[1:].sum()), int(per_fn[1:].sum())
        scores = {"tp": tp, "fp": fp, "fn": fn, "iou": ratio(tp, tp + fp + fn), "dice": ratio(2 * tp, 2 * tp + fp + fn)}
        accuracy = ratio(int(self.matrix.trace()), int(self.matrix.sum()))
        mean_iou = float(np.mean(ious)) if ious else None
        return {**scores, "accuracy": accuracy, "mean_iou": mean_iou, "per_class": per_class}


def binary_metrics(tp: int, fp: int, fn: int, tn: int) -> dict:
    """The counts and the scores derived from them; F1 and Dice are the same number."""
    tp, fp, fn, tn = int(tp), int(fp), int(fn), int(tn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    scores = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "f1": f1, "dice": f1, "iou": ratio(tp, tp + fp + fn)}
    rates = {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp)}
    return {**scores, **rates, "accuracy": ratio(tp + tn, tp + fp + fn + tn)}
