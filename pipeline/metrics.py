"""Threshold-free binary scores, accumulated batch by batch: exactly scikit-learn's, nothing quantised.

Memory and design: docs/inference.md, "Exact curves".
"""

from __future__ import annotations

import numpy as np

from pipeline.confusion import binary_metrics, flat_valid


class ProbabilityCounts:
    """Pixel counts per distinct float32 probability (``values``, increasing), split by true label: ``counts[i]``
    is (negatives, positives) at ``values[i]``."""

    def __init__(self):
        self.values = np.zeros(0, dtype=np.float32)
        self.counts = np.zeros((0, 2), dtype=np.int64)  # [:, 0] negatives, [:, 1] positives

    def update(self, probs, target, valid_mask=None) -> None:
        """Add probabilities and their 0/1 targets (any matching shapes)."""
        target, probs = flat_valid(target, probs, valid_mask)
        if target.numel() and (target.min() < 0 or target.max() > 1):
            raise ValueError("binary targets must be 0 or 1")
        probs = probs.float()
        if probs.isnan().any():  # NaN would neither sort nor merge
            raise ValueError("probabilities must not be NaN")
        values, inverse = np.unique(probs.numpy(), return_inverse=True)
        counts = np.bincount(inverse * 2 + target.numpy(), minlength=2 * len(values)).reshape(-1, 2)
        self._merge(values, counts)

    def __iadd__(self, other: ProbabilityCounts) -> ProbabilityCounts:
        self._merge(other.values, other.counts)
        return self

    def _merge(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add ``counts`` at the sorted distinct ``values``: onto a value already held, else inserted in order."""
        position = np.searchsorted(self.values, values)
        held = position < len(self.values)
        held[held] = self.values[position[held]] == values[held]
        # Distinct added values land on distinct held ones, so the fancy-indexed += adds each count once.
        self.counts[position[held]] += counts[held]
        new = ~held
        self.values = np.insert(self.values, position[new], values[new])
        self.counts = np.insert(self.counts, position[new], counts[new], axis=0)

    def _counts_above(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP at every threshold, lowest first: entry ``i`` predicts ``values[i:]`` positive."""
        above = np.zeros((len(self.values) + 1, 2), dtype=np.int64)
        above[:-1] = np.cumsum(self.counts[::-1], axis=0)[::-1]
        return above[:, 1], above[:, 0]

    def counts_at(self, threshold: float = 0.5) -> tuple[int, int, int, int]:
        """TP, FP, FN, TN when ``probability > threshold`` (in float64: 0.1 is not float32's 0.1) is positive."""
        first_above = int(np.searchsorted(self.values.astype(np.float64), threshold, side="right"))
        negatives_above, positives_above = self.counts[first_above:].sum(axis=0).tolist()
        negatives, positives = self.counts.sum(axis=0).tolist()
        return positives_above, negatives_above, positives - positives_above, negatives - negatives_above

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's ``roc_curve(..., drop_intermediate=False)``: (FPR, TPR), empty when a class has no pixels."""
        tp, fp = self._counts_above()
        if not tp[0] or not fp[0]:
            return np.zeros(0), np.zeros(0)
        return fp[::-1] / fp[0], tp[::-1] / tp[0]

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """scikit-learn's ``precision_recall_curve`` reversed, from (0, 1): empty when there are no positives."""
        tp, fp = self._counts_above()
        if not tp[0]:
            return np.zeros(0), np.zeros(0)
        tp, predicted = tp[::-1], (tp + fp)[::-1]
        precision = np.divide(tp, predicted, out=np.ones(len(tp)), where=predicted > 0)
        return tp / tp[-1], precision

    def roc_auc(self) -> float | None:
        """Area under the ROC curve by the trapezoidal rule (ties count one half, as in scikit-learn)."""
        fpr, tpr = self.roc_curve()
        return float(np.trapezoid(tpr, fpr)) if len(fpr) else None

    def average_precision(self) -> float | None:
        """scikit-learn's average precision: sum over thresholds of (recall step) x precision, no interpolation."""
        recall, precision = self.pr_curve()
        if not len(recall):
            return None
        return float(np.sum(np.diff(recall) * precision[1:]))

    def best_f1_threshold(self) -> tuple[float, float]:
        """The lowest threshold maximising F1 for ``probability > threshold``, and that F1; where every pixel
        positive is best, the smallest value minus one (docs/inference.md, "Exact curves")."""
        if not len(self.values):
            raise ValueError("no pixels to choose a threshold from")
        tp, fp = self._counts_above()
        fn = tp[0] - tp
        denominator = 2 * tp + fp + fn  # 0 only where nothing is predicted and there are no positives
        f1 = np.divide(2 * tp, denominator, out=np.zeros(len(tp)), where=denominator > 0)
        best = int(np.argmax(f1))  # the first maximum: the lowest threshold
        threshold = float(self.values[best - 1]) if best else float(self.values[0]) - 1.0
        return threshold, float(f1[best])

    def summary(self, threshold: float = 0.5) -> dict:
        """:func:`binary_metrics` at ``threshold`` plus the threshold-free ``roc_auc`` and ``pr_auc``."""
        scores = binary_metrics(*self.counts_at(threshold))
        return {**scores, "roc_auc": self.roc_auc(), "pr_auc": self.average_precision()}


def downsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points spread evenly along the curve's length, both ends kept."""
    if len(x) == 0:
        return x, y
    # Consecutive thresholds can give the same point (precision 0 until the first positive); they add nothing.
    changed = np.concatenate([[True], (np.diff(x) != 0) | (np.diff(y) != 0)])
    x, y = x[changed], y[changed]
    if len(x) <= max_points:
        return x, y
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    index = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    index = np.unique(np.clip(index, 0, len(x) - 1))
    return x[index], y[index]
