"""Boundary and topology scores of a predicted mask against the truth, image by image, inside the valid pixels.

HD95 and normalised surface Dice per class (boundaries from SciPy's distance transform), and for a binary task
clDice (skeletons from scikit-image) and the difference in connected components. Definitions: docs/inference.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

NSD_TOLERANCE_PX = 1.0  # a boundary pixel within this distance of the other mask's boundary counts as matched
EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it; beyond the image counts as outside."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_and_nsd(truth: np.ndarray, pred: np.ndarray, tolerance: float = NSD_TOLERANCE_PX) -> tuple[float, float]:
    """HD95 (the larger of the two directed 95th percentiles, as MONAI defines it; NaN unless both masks hold
    pixels) and the normalised surface Dice at ``tolerance`` (0 when only one of them does)."""
    if not truth.any() or not pred.any():
        return float("nan"), 0.0
    rows, cols = np.nonzero(truth | pred)  # distances are computed on the pair's bounding box, one pixel wider
    box = np.s_[max(rows.min() - 1, 0) : rows.max() + 2, max(cols.min() - 1, 0) : cols.max() + 2]
    edge_truth, edge_pred = boundary(truth)[box], boundary(pred)[box]
    to_pred = ndimage.distance_transform_edt(~edge_pred)[edge_truth]  # from each boundary pixel to the other's
    to_truth = ndimage.distance_transform_edt(~edge_truth)[edge_pred]
    hd95 = max(np.percentile(to_pred, 95), np.percentile(to_truth, 95))
    matched = np.count_nonzero(to_pred <= tolerance) + np.count_nonzero(to_truth <= tolerance)
    return float(hd95), matched / (len(to_pred) + len(to_truth))


class ShapeScores:
    """Per class, HD95 and NSD of each image that holds the class in its truth or its prediction, averaged over
    those images; with ``topology``, clDice over all images and the mean difference in 8-connected components."""

    def __init__(self, num_classes: int, topology: bool):
        self.per_class = {c: ([], []) for c in range(1, num_classes)}  # class: (HD95s, NSDs); not background
        self.topology = topology
        self.skeleton_sums = np.zeros(4, dtype=np.int64)  # |S(P) & G|, |S(P)|, |S(G) & P|, |S(G)|
        self.component_errors: list[int] = []

    def update(self, truth: np.ndarray, pred: np.ndarray, valid: np.ndarray | None) -> None:
        if valid is not None:  # outside the valid pixels nothing counts: background in both
            truth, pred = np.where(valid, truth, 0), np.where(valid, pred, 0)
        for c, (hd95s, nsds) in self.per_class.items():
            t, p = truth == c, pred == c
            if t.any() or p.any():
                hd95, nsd = hd95_and_nsd(t, p)
                hd95s.append(hd95)
                nsds.append(nsd)
        if self.topology:
            t, p = truth == 1, pred == 1
            skeleton_p, skeleton_t = skeletonize(p), skeletonize(t)
            self.skeleton_sums += [(skeleton_p & t).sum(), skeleton_p.sum(), (skeleton_t & p).sum(), skeleton_t.sum()]
            components = [ndimage.label(m, structure=EIGHT_NEIGHBOURS)[1] for m in (p, t)]
            self.component_errors.append(abs(components[0] - components[1]))

    def class_scores(self) -> dict[int, dict]:
        """``{class: {"hd95", "nsd"}}``, None where no image scored it (HD95: where none held it in both)."""
        return {c: {"hd95": _mean(hd95s), "nsd": _mean(nsds)} for c, (hd95s, nsds) in self.per_class.items()}

    def summary(self) -> dict:
        """HD95 and NSD averaged over the foreground classes; clDice and the component error if ``topology``."""
        scores = self.class_scores().values()
        out = {key: _mean([s[key] for s in scores if s[key] is not None]) for key in ("hd95", "nsd")}
        if self.topology:
            hits_p, skeleton_p, hits_t, skeleton_t = self.skeleton_sums.tolist()
            precision = hits_p / skeleton_p if skeleton_p else 0.0
            sensitivity = hits_t / skeleton_t if skeleton_t else 0.0
            total = precision + sensitivity
            out["cldice"] = 2 * precision * sensitivity / total if total else 0.0
            out["component_error"] = _mean(self.component_errors)
        return out


def _mean(values) -> float | None:
    """The mean of the values that are not NaN; None where there are none."""
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else None
