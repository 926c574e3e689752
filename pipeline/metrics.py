"""Segmentation metrics, accumulated batch by batch so that evaluation never holds a whole test set.

Multiclass: a confusion matrix (rows = true class, columns = predicted), as in torchvision's
``references/segmentation/utils.py``; every multiclass number is derived from it.

Binary: a histogram of predicted probabilities split by true label. Probabilities are quantised to
``1 / bins`` (1e-4 by default): bin ``i`` holds ``p`` in ``(i / bins, (i + 1) / bins]`` (bin 0 also holds 0),
so ``p > i / bins`` exactly when ``bin >= i``. The counts at any threshold on that grid are therefore exact
(float32 probabilities times 10,000 are exact in float64), and ROC-AUC and average precision are exact for
the quantised probabilities; quantisation only turns probabilities closer than 1e-4 into ties, which moves
ROC-AUC by at most half the fraction of (positive, negative) pairs sharing a bin.

A metric whose denominator is zero (IoU of a class absent from both target and prediction, specificity of
an image without negatives) is ``None``: JSON has no NaN, and 0 would read as "all wrong".
"""

from __future__ import annotations

import numpy as np
import torch


def ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def _flat_valid(target, pred, valid_mask) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.as_tensor(target).reshape(-1).long()
    pred = torch.as_tensor(pred).reshape(-1)
    if target.shape != pred.shape:
        raise ValueError(f"target has {target.numel()} values but prediction has {pred.numel()}")
    if valid_mask is not None:
        keep = torch.as_tensor(valid_mask).reshape(-1).bool()
        target, pred = target[keep], pred[keep]
    return target, pred


# ------------------------------------------------------------------------------------------ multiclass


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (int64)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, target, pred, valid_mask=None) -> None:
        """Add a batch of label maps (any matching shapes); pixels where ``valid_mask`` is false are skipped."""
        target, pred = _flat_valid(target, pred, valid_mask)
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
            per_class[name] = {"tp": t, "fp": p, "fn": n, "iou": ratio(t, t + p + n), "dice": ratio(2 * t, 2 * t + p + n)}
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


# ------------------------------------------------------------------------------------------ binary


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


class ProbabilityHistogram:
    """Pixel counts per quantised probability, separately for negative and positive pixels.

    ``bins`` int64 pairs are all it keeps, whatever the number of pixels (10,000 bins: 160 kB).
    """

    def __init__(self, bins: int = 10_000):
        self.bins = bins
        self.counts = torch.zeros((bins, 2), dtype=torch.int64)  # [:, 0] negatives, [:, 1] positives

    def update(self, probs, target, valid_mask=None) -> None:
        """Add probabilities in [0, 1] and their 0/1 targets (any matching shapes)."""
        target, probs = _flat_valid(target, probs, valid_mask)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError("binary targets must be 0 or 1")
        # float64: a float32 probability times 10,000 is exact there, so the bin edges are exact.
        index = torch.ceil(probs.double() * self.bins).long().sub_(1).clamp_(0, self.bins - 1)
        self.counts += torch.bincount(index * 2 + target, minlength=2 * self.bins).reshape(self.bins, 2)

    def __iadd__(self, other: ProbabilityHistogram) -> ProbabilityHistogram:
        if other.bins != self.bins:
            raise ValueError(f"cannot add a histogram of {other.bins} bins to one of {self.bins}")
        self.counts += other.counts
        return self

    def _counts_above(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP for every threshold ``i / bins``, i = 0..bins: pixels in bins >= i are predicted positive."""
        reverse_cumsum = self.counts.flip(0).cumsum(0).flip(0).numpy()
        above = np.concatenate([reverse_cumsum, np.zeros((1, 2), dtype=np.int64)])
        return above[:, 1], above[:, 0]

    def _threshold_index(self, threshold: float) -> int:
        index = round(threshold * self.bins)
        if not 0 <= index <= self.bins or abs(index - threshold * self.bins) > 1e-6:
            raise ValueError(f"threshold {threshold} is not a multiple of 1/{self.bins} in [0, 1]")
        return index

    def counts_at(self, threshold: float = 0.5) -> tuple[int, int, int, int]:
        """TP, FP, FN, TN when ``probability > threshold`` is predicted positive."""
        tp, fp = self._counts_above()
        i = self._threshold_index(threshold)
        positives, negatives = int(tp[0]), int(fp[0])
        return int(tp[i]), int(fp[i]), positives - int(tp[i]), negatives - int(fp[i])

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) at every threshold, from (0, 0) to (1, 1); empty when a class has no pixels."""
        tp, fp = self._counts_above()
        if not tp[0] or not fp[0]:
            return np.zeros(0), np.zeros(0)
        return fp[::-1] / fp[0], tp[::-1] / tp[0]

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at every threshold predicting at least one positive, recall increasing."""
        tp, fp = self._counts_above()
        if not tp[0]:
            return np.zeros(0), np.zeros(0)
        predicted = tp + fp
        keep = predicted > 0
        return (tp[keep] / tp[0])[::-1], (tp[keep] / predicted[keep])[::-1]

    def roc_auc(self) -> float | None:
        """Area under the ROC curve by the trapezoidal rule (ties count one half, as in scikit-learn)."""
        fpr, tpr = self.roc_curve()
        return float(np.trapezoid(tpr, fpr)) if len(fpr) else None

    def average_precision(self) -> float | None:
        """scikit-learn's average precision: sum over thresholds of (recall step) x precision, no interpolation."""
        recall, precision = self.pr_curve()
        if not len(recall):
            return None
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def best_f1_threshold(self) -> tuple[float, float | None]:
        """The grid threshold maximising F1, and that F1; the lowest such threshold on a tie."""
        tp, fp = self._counts_above()
        fn = tp[0] - tp
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
        best = int(np.argmax(f1))
        return best / self.bins, (float(f1[best]) if denominator[best] else None)

    def summary(self, threshold: float = 0.5) -> dict:
        """:func:`binary_metrics` at ``threshold`` plus the threshold-free ``roc_auc`` and ``pr_auc``."""
        return {**binary_metrics(*self.counts_at(threshold)), "roc_auc": self.roc_auc(), "pr_auc": self.average_precision()}


def downsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points spread evenly along the curve's length, both ends kept.

    Evenly along the length rather than over thresholds: a well-trained model puts most pixels near 0 or 1,
    so most thresholds sit on one short stretch of the curve.
    """
    if len(x) == 0:
        return x, y
    # Many consecutive thresholds give the same point (empty bins); they add nothing to a plot.
    changed = np.concatenate([[True], (np.diff(x) != 0) | (np.diff(y) != 0)])
    x, y = x[changed], y[changed]
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    index = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    index = np.unique(np.clip(index, 0, len(x) - 1))
    return x[index], y[index]
