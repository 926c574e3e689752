"""pipeline.metrics against independent implementations (torchmetrics, scikit-learn) and a hand-worked case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from torchmetrics.classification import MulticlassStatScores

from pipeline.confusion import ConfusionMatrix, binary_metrics
from pipeline.metrics import ProbabilityCounts, downsample_curve
from pipeline.shapes import ShapeScores, hd95_and_nsd

# ------------------------------------------------------------------------------------------ multiclass


def test_confusion_matrix_hand_worked():
    # Pixels (true -> predicted): 0->0 correct background, 0->1 background taken for class 1 (an FP),
    # 1->1 correct, 1->2 wrong class (an FP for 2 and an FN for 1), 2->2 correct, 2->0 missed (an FN);
    # the last pixel is wrong too but outside the valid mask, so it must not count.
    target = torch.tensor([0, 0, 1, 1, 2, 2, 1])
    pred = torch.tensor([0, 1, 1, 2, 2, 0, 0])
    valid = torch.tensor([True] * 6 + [False])
    cm = ConfusionMatrix(3)
    cm.update(target, pred, valid)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    s = cm.summary(["bg", "a", "b"])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 2)
    assert s["iou"] == pytest.approx(2 / 6) and s["dice"] == pytest.approx(4 / 8)
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["per_class"]["a"] == {"tp": 1, "fp": 1, "fn": 1, "iou": pytest.approx(1 / 3), "dice": pytest.approx(0.5)}
    assert s["per_class"]["bg"]["fp"] == 1 and s["per_class"]["bg"]["fn"] == 1
    assert s["mean_iou"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_confusion_matrix_matches_torchmetrics_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 6
    # Class 5 never occurs, class 3 only in predictions, class 4 only in targets.
    target = rng.choice([0, 1, 2, 4], size=(4, 16, 16), p=[0.6, 0.2, 0.1, 0.1]).astype(np.uint8)
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.choice([0, 1, 2, 3], size=target.shape)).astype(
        np.uint8
    )
    pred[pred == 4] = 3 * (seed % 2)  # some 4 -> 3 confusions (seed 1), some 4 -> 0 misses (seed 0)
    valid = rng.random(target.shape) < 0.8

    cm = ConfusionMatrix(k)
    for b in range(len(target)):  # accumulated batch by batch, as evaluate does
        cm.update(
            torch.from_numpy(target[b : b + 1]), torch.from_numpy(pred[b : b + 1]), torch.from_numpy(valid[b : b + 1])
        )

    t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
    np.testing.assert_array_equal(cm.matrix.numpy(), confusion_matrix(t, p, labels=range(k)))

    stats = MulticlassStatScores(num_classes=k, average=None)(torch.from_numpy(p), torch.from_numpy(t))
    tp_ref, fp_ref, _, fn_ref, _ = stats.T.numpy()
    tp, fp, fn = cm.per_class_counts()
    np.testing.assert_array_equal(tp, tp_ref)
    np.testing.assert_array_equal(fp, fp_ref)
    np.testing.assert_array_equal(fn, fn_ref)

    names = [f"c{i}" for i in range(k)]
    s = cm.summary(names)
    assert (s["tp"], s["fp"], s["fn"]) == (tp_ref[1:].sum(), fp_ref[1:].sum(), fn_ref[1:].sum())
    assert s["tp"] + s["fn"] == int((t != 0).sum())  # every foreground target pixel is a TP or an FN
    assert s["accuracy"] == pytest.approx((t == p).mean())
    assert s["per_class"]["c5"]["iou"] is None and s["per_class"]["c5"]["dice"] is None
    assert s["per_class"]["c3"]["iou"] == 0.0  # predicted, never true: a real zero, not "absent"
    ious = jaccard_score(t, p, labels=[c for c in range(k) if c != 5], average=None, zero_division=0)
    assert [s["per_class"][f"c{c}"]["iou"] for c in range(5)] == pytest.approx(ious)
    assert s["mean_iou"] == pytest.approx(ious.mean())


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ConfusionMatrix(3).update(torch.tensor([0, 3]), torch.tensor([0, 0]))


# ------------------------------------------------------------------------------------------ binary


def test_binary_hand_worked():
    # Dyadic probabilities are exact in binary; ranked 0.875(+) 0.75(-) 0.375(+) 0.25(-).
    h = ProbabilityCounts()
    h.update(torch.tensor([0.875, 0.75, 0.375, 0.25]), torch.tensor([1, 0, 1, 0]))
    assert h.counts_at(0.5) == (1, 1, 1, 1)
    assert h.counts_at(0.375) == (1, 1, 1, 1)  # strictly above: the positive at 0.375 is missed
    s = h.summary(0.5)
    assert (s["f1"], s["dice"], s["iou"]) == (0.5, 0.5, pytest.approx(1 / 3))
    assert (s["sensitivity"], s["specificity"], s["accuracy"]) == (0.5, 0.5, 0.5)
    assert s["roc_auc"] == 0.75  # 3 of the 4 (positive, negative) pairs are ranked right
    assert s["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # precision 1 at recall 1/2, 2/3 at recall 1
    # p > 0.25 finds both positives and one negative: F1 = 4/5, the best there is.
    assert h.best_f1_threshold() == (0.25, pytest.approx(0.8))
    recall, precision = h.pr_curve()
    assert recall.tolist() == [0, 0.5, 0.5, 1, 1]
    assert precision.tolist() == pytest.approx([1, 1, 0.5, 2 / 3, 0.5])


def test_binary_metrics_undefined_scores_are_none():
    s = binary_metrics(tp=0, fp=0, fn=0, tn=5)
    assert s["f1"] is None and s["iou"] is None and s["sensitivity"] is None
    assert s["specificity"] == 1.0 and s["accuracy"] == 1.0
    assert ProbabilityCounts().roc_auc() is None and ProbabilityCounts().average_precision() is None
    negatives_only, positives_only = ProbabilityCounts(), ProbabilityCounts()
    negatives_only.update(torch.tensor([0.25, 0.75]), torch.tensor([0, 0]))
    positives_only.update(torch.tensor([0.25, 0.75]), torch.tensor([1, 1]))
    assert negatives_only.roc_auc() is None and negatives_only.average_precision() is None
    assert positives_only.roc_auc() is None and positives_only.average_precision() == 1.0  # as scikit-learn


def random_scores(seed: int, kind: str = "normal", n: int = 50_000):
    """Probabilities that carry some signal (so every metric is far from trivial), and a random valid mask.

    ``normal``: clipped normals, so many pixels tie at exactly 0 and 1; ``ties``: rounded to 0.01, every value
    shared by hundreds of pixels of both labels; ``sigmoid``: float32 sigmoids of logits spread as a trained
    vessel model's are (a tenth positive), nearly all distinct, some saturated at exactly 1.
    """
    rng = np.random.default_rng(seed)
    if kind == "sigmoid":
        target = (rng.random(n) < 0.1).astype(np.int64)
        logits = rng.normal(np.where(target == 1, 4.0, -10.0), 4.0).astype(np.float32)
        probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    else:
        target = (rng.random(n) < 0.3).astype(np.int64)
        probs = np.clip(rng.normal(0.35 + 0.3 * target, 0.2), 0, 1).astype(np.float32)
        if kind == "ties":
            probs = np.round(probs, 2).astype(np.float32)
    valid = rng.random(n) < 0.9
    return probs, target, valid


def accumulated(probs, target, valid, pieces: int = 7) -> ProbabilityCounts:
    """Accumulated as evaluate does: several updates, and two accumulators merged with ``+=``."""
    first, second = ProbabilityCounts(), ProbabilityCounts()
    for i, part in enumerate(np.array_split(np.arange(len(probs)), pieces)):
        into = first if i < pieces // 2 else second
        into.update(torch.from_numpy(probs[part]), torch.from_numpy(target[part]), torch.from_numpy(valid[part]))
    first += second
    return first


@pytest.mark.parametrize("kind", ["normal", "ties", "sigmoid"])
def test_accumulation_keeps_every_distinct_probability(kind):
    probs, target, valid = random_scores(0, kind)
    h = accumulated(probs, target, valid)
    p, t = probs[valid], target[valid]
    values, inverse = np.unique(p, return_inverse=True)
    np.testing.assert_array_equal(h.values, values)
    np.testing.assert_array_equal(h.counts[:, 0], np.bincount(inverse[t == 0], minlength=len(values)))
    np.testing.assert_array_equal(h.counts[:, 1], np.bincount(inverse[t == 1], minlength=len(values)))


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_counts_match_sklearn(seed):
    probs, target, valid = random_scores(seed)
    h = accumulated(probs, target, valid)
    p, t = probs[valid], target[valid]
    # Dyadic (0.5, 0.3125), off every float32 (0.2), exactly one pixel's probability (p[0]), values many pixels
    # share (0 and 1 after clipping), below them all (-0.5).
    for threshold in (0.5, 0.3125, 0.2, float(p[0]), 0.0, 1.0, -0.5):
        # Exact comparison: float64 holds every float32 and the threshold.
        pred = (p.astype(np.float64) > threshold).astype(np.int64)
        s = binary_metrics(*h.counts_at(threshold))
        (tn, fp), (fn, tp) = confusion_matrix(t, pred, labels=[0, 1])
        assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (tp, fp, fn, tn)
        if tp:
            assert s["f1"] == pytest.approx(f1_score(t, pred), abs=1e-12)
            assert s["iou"] == pytest.approx(jaccard_score(t, pred), abs=1e-12)
        assert s["sensitivity"] == pytest.approx(recall_score(t, pred, zero_division=0), abs=1e-12)
        assert s["specificity"] == pytest.approx(recall_score(1 - t, 1 - pred, zero_division=0), abs=1e-12)
        assert s["accuracy"] == pytest.approx((t == pred).mean(), abs=1e-12)
    assert precision_score(t, p > 0.5) > 0  # the data are informative, not a degenerate case


@pytest.mark.parametrize("kind", ["normal", "ties", "sigmoid"])
@pytest.mark.parametrize("seed", [0, 1])
def test_curves_and_areas_match_sklearn(kind, seed):
    probs, target, valid = random_scores(seed, kind)
    h = accumulated(probs, target, valid)
    p, t = probs[valid], target[valid]
    assert h.roc_auc() == pytest.approx(roc_auc_score(t, p), abs=1e-6)
    assert h.average_precision() == pytest.approx(average_precision_score(t, p), abs=1e-6)
    fpr, tpr = h.roc_curve()
    fpr_ref, tpr_ref, _ = roc_curve(t, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_ref, rtol=0, atol=1e-12)
    recall, precision = h.pr_curve()
    precision_ref, recall_ref, _ = precision_recall_curve(t, p)
    np.testing.assert_allclose(recall, recall_ref[::-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(precision, precision_ref[::-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["normal", "ties", "sigmoid"])
def test_best_f1_threshold_matches_brute_force(kind):
    probs, target, valid = random_scores(2, kind, n=3_000)
    h = accumulated(probs, target, valid)
    p, t = probs[valid], target[valid]
    # Every rule p > c: c at each distinct probability, and c below them all (every pixel positive).
    candidates = np.concatenate([[-1.0], np.unique(p).astype(np.float64)])
    pred = p[None, :] > candidates[:, None]
    tp, fp, fn = (pred & (t == 1)).sum(1), (pred & (t == 0)).sum(1), (~pred & (t == 1)).sum(1)
    f1 = 2 * tp / (2 * tp + fp + fn)
    lowest_best = int(np.flatnonzero(f1 == f1.max())[0])
    threshold, best = h.best_f1_threshold()
    assert best == f1.max()
    assert isinstance(threshold, float)
    # The same set of pixels predicted positive as the lowest best candidate, and exactly that F1 again.
    np.testing.assert_array_equal(p > threshold, pred[lowest_best])
    if lowest_best:
        assert threshold == candidates[lowest_best]
    assert binary_metrics(*h.counts_at(threshold))["f1"] == best


def test_best_f1_threshold_below_every_probability():
    # Every pixel positive is best (F1 = 4/5): a threshold below the smallest probability, and one that holds
    # with denormals flushed to zero, as the stages run (pipeline.runtime.setup).
    h = ProbabilityCounts()
    h.update(torch.tensor([0.0, 0.5, 0.5]), torch.tensor([1, 0, 1]))
    threshold, best = h.best_f1_threshold()
    assert threshold == -1.0
    assert best == pytest.approx(0.8) and h.counts_at(threshold) == (2, 1, 0, 0)
    torch.set_flush_denormal(True)
    try:
        assert h.counts_at(threshold) == (2, 1, 0, 0)
    finally:
        torch.set_flush_denormal(False)
    with pytest.raises(ValueError, match="no pixels"):
        ProbabilityCounts().best_f1_threshold()


def test_curves_and_downsampling():
    probs, target, valid = random_scores(1, "sigmoid")
    h = accumulated(probs, target, valid)
    fpr, tpr = h.roc_curve()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    x, y = downsample_curve(fpr, tpr, 500)
    assert len(x) <= 500 and (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(y, x) == pytest.approx(h.roc_auc(), abs=1e-3)  # still the same curve
    recall, precision = h.pr_curve()
    assert np.all(np.diff(recall) >= 0) and (recall[0], precision[0], recall[-1]) == (0, 1, 1)
    assert precision[-1] == pytest.approx(target[valid].mean())  # the lowest value: every pixel predicted positive


def test_binary_rejects_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        ProbabilityCounts().update(torch.tensor([0.5]), torch.tensor([2]))
    with pytest.raises(ValueError, match="NaN"):
        ProbabilityCounts().update(torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ boundaries, topology
# A second implementation: boundaries by a loop over each pixel's 4 neighbours, distances between every pair of
# boundary pixels by brute force (no distance transform, no erosion).
STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def brute_boundary(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    inside = lambda y, x: 0 <= y < h and 0 <= x < w and mask[y, x]  # noqa: E731
    return np.array(
        [[mask[y, x] and not all(inside(y + dy, x + dx) for dy, dx in STEPS) for x in range(w)] for y in range(h)]
    )


def brute_hd95_and_nsd(truth: np.ndarray, pred: np.ndarray, tolerance: float) -> tuple[float, float]:
    a, b = np.argwhere(brute_boundary(truth)), np.argwhere(brute_boundary(pred))
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    to_pred, to_truth = distances.min(axis=1), distances.min(axis=0)
    hd95 = max(np.percentile(to_pred, 95), np.percentile(to_truth, 95))
    nsd = ((to_pred <= tolerance).sum() + (to_truth <= tolerance).sum()) / (len(to_pred) + len(to_truth))
    return hd95, nsd


def blobs(rng: np.random.Generator, shape=(20, 24)) -> np.ndarray:
    """A few random rectangles: several components, holes, pixels on the image's edge."""
    mask = np.zeros(shape, bool)
    for _ in range(rng.integers(1, 4)):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[y : y + rng.integers(2, 9), x : x + rng.integers(2, 11)] ^= True
    return mask


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_hd95_and_surface_dice_equal_a_brute_force_count(seed, tolerance):
    rng = np.random.default_rng(seed)
    truth, pred = blobs(rng), blobs(rng)
    assert hd95_and_nsd(truth, pred, tolerance) == pytest.approx(brute_hd95_and_nsd(truth, pred, tolerance), abs=1e-9)


def test_boundary_scores_of_known_cases():
    square = np.zeros((12, 12), bool)
    square[2:8, 2:8] = True
    assert hd95_and_nsd(square, square) == (0.0, 1.0)
    shifted = np.roll(square, 3, axis=1)  # every boundary pixel 3 pixels from the other's, or on it
    hd95, nsd = hd95_and_nsd(square, shifted)
    assert hd95 == 3.0 and 0 < nsd < 1
    hd95, nsd = hd95_and_nsd(square, np.zeros_like(square))  # a class predicted nowhere
    assert np.isnan(hd95) and nsd == 0.0


def test_cldice_and_components_of_known_vessels():
    truth = np.zeros((16, 40), np.uint8)
    truth[8, 2:38] = 1  # one vessel, one pixel wide: its own skeleton
    half = truth.copy()
    half[8, 20:] = 0  # the prediction finds its left half
    scores = ShapeScores(2, topology=True)
    scores.update(truth, half, None)
    summary = scores.summary()
    # Every predicted skeleton pixel is vessel (precision 1); half the true skeleton is found (sensitivity 1/2).
    assert summary["cldice"] == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert summary["component_error"] == 0
    broken = truth.copy()
    broken[8, 10] = broken[8, 20] = 0  # three pieces where the truth has one
    outside = np.ones_like(truth, dtype=bool)
    outside[:, 30:] = False  # beyond the field of view: neither mask counts there
    scores = ShapeScores(2, topology=True)
    scores.update(truth, broken, outside)
    assert scores.summary()["component_error"] == 2
    assert scores.summary()["cldice"] == pytest.approx(2 * 1 * (26 / 28) / (1 + 26 / 28))


def test_shape_scores_average_each_class_over_the_images_that_hold_it():
    rng = np.random.default_rng(7)
    images = [(blobs(rng).astype(np.uint8) * 2, blobs(rng).astype(np.uint8) * 2) for _ in range(3)]
    scores = ShapeScores(3, topology=False)
    for truth, pred in images:
        scores.update(truth, pred, None)
    expected = [brute_hd95_and_nsd(t == 2, p == 2, 1.0) for t, p in images]
    by_class = scores.class_scores()
    assert by_class[1] == {"hd95": None, "nsd": None}  # class 1 is in no image
    assert by_class[2]["hd95"] == pytest.approx(np.mean([e[0] for e in expected]))
    assert by_class[2]["nsd"] == pytest.approx(np.mean([e[1] for e in expected]))
    assert scores.summary() == {"hd95": by_class[2]["hd95"], "nsd": by_class[2]["nsd"]}
