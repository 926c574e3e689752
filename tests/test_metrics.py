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
    precision_score,
    recall_score,
    roc_auc_score,
)
from torchmetrics.classification import MulticlassStatScores

from pipeline.metrics import ConfusionMatrix, ProbabilityHistogram, binary_metrics, downsample_curve

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
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.choice([0, 1, 2, 3], size=target.shape)).astype(np.uint8)
    pred[pred == 4] = 3 * (seed % 2)  # some 4 -> 3 confusions (seed 1), some 4 -> 0 misses (seed 0)
    valid = rng.random(target.shape) < 0.8

    cm = ConfusionMatrix(k)
    for b in range(len(target)):  # accumulated batch by batch, as evaluate does
        cm.update(torch.from_numpy(target[b : b + 1]), torch.from_numpy(pred[b : b + 1]), torch.from_numpy(valid[b : b + 1]))

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
    h = ProbabilityHistogram()
    h.update(torch.tensor([0.875, 0.75, 0.375, 0.25]), torch.tensor([1, 0, 1, 0]))
    assert h.counts_at(0.5) == (1, 1, 1, 1)
    s = h.summary(0.5)
    assert (s["f1"], s["dice"], s["iou"]) == (0.5, 0.5, pytest.approx(1 / 3))
    assert (s["sensitivity"], s["specificity"], s["accuracy"]) == (0.5, 0.5, 0.5)
    assert s["roc_auc"] == 0.75  # 3 of the 4 (positive, negative) pairs are ranked right
    assert s["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # precision 1 at recall 1/2, 2/3 at recall 1
    # p > t for t in [0.25, 0.375) finds both positives and one negative: F1 = 4/5, the best there is.
    assert h.best_f1_threshold() == (0.25, pytest.approx(0.8))


def test_binary_metrics_undefined_scores_are_none():
    s = binary_metrics(tp=0, fp=0, fn=0, tn=5)
    assert s["f1"] is None and s["iou"] is None and s["sensitivity"] is None
    assert s["specificity"] == 1.0 and s["accuracy"] == 1.0
    assert ProbabilityHistogram().roc_auc() is None


def random_scores(seed: int, n: int = 50_000, quantised: bool = False):
    """Probabilities that carry some signal (so every metric is far from trivial), and a random valid mask."""
    rng = np.random.default_rng(seed)
    target = (rng.random(n) < 0.3).astype(np.int64)
    probs = np.clip(rng.normal(0.35 + 0.3 * target, 0.2), 0, 1).astype(np.float32)
    if quantised:  # bin centres: one value per 1e-4 bin, so the histogram loses nothing but the ties
        probs = ((np.floor(probs * 10_000).clip(0, 9_999) + 0.5) / 10_000).astype(np.float32)
    valid = rng.random(n) < 0.9
    return probs, target, valid


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_counts_match_sklearn(seed):
    probs, target, valid = random_scores(seed)
    h = ProbabilityHistogram()
    for part in np.array_split(np.arange(len(probs)), 7):  # accumulated in pieces
        h.update(torch.from_numpy(probs[part]), torch.from_numpy(target[part]), torch.from_numpy(valid[part]))
    p, t = probs[valid], target[valid]
    for threshold in (0.5, 0.3125, 0.2):
        # Counts on the 1e-4 grid are exact, so the scores must agree to rounding error.
        pred = (p > np.float32(threshold)).astype(np.int64)
        s = binary_metrics(*h.counts_at(threshold))
        (tn, fp), (fn, tp) = confusion_matrix(t, pred)
        assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (tp, fp, fn, tn)
        assert s["f1"] == pytest.approx(f1_score(t, pred), abs=1e-12)
        assert s["iou"] == pytest.approx(jaccard_score(t, pred), abs=1e-12)
        assert s["sensitivity"] == pytest.approx(recall_score(t, pred), abs=1e-12)
        assert s["specificity"] == pytest.approx(recall_score(1 - t, 1 - pred), abs=1e-12)
        assert s["accuracy"] == pytest.approx((t == pred).mean(), abs=1e-12)
        assert precision_score(t, pred) > 0  # the data are informative, not a degenerate case


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_exact_on_quantised_probabilities(seed):
    # With probabilities already on the grid the histogram loses nothing: the areas equal scikit-learn's.
    probs, target, valid = random_scores(seed, quantised=True)
    h = ProbabilityHistogram()
    h.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(valid))
    assert h.roc_auc() == pytest.approx(roc_auc_score(target[valid], probs[valid]), abs=1e-12)
    assert h.average_precision() == pytest.approx(average_precision_score(target[valid], probs[valid]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_close_on_raw_probabilities(seed):
    probs, target, valid = random_scores(seed)
    p, t = probs[valid], target[valid]
    h = ProbabilityHistogram()
    h.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(valid))
    # Quantising only ties (positive, negative) pairs that share a 1e-4 bin; each such pair moves ROC-AUC by at
    # most 1/2 of its weight 1 / (P * N). The bound is computed from the histogram itself (~1e-4 here).
    negatives, positives = h.counts.double().T
    bound = 0.5 * float((negatives * positives).sum() / (negatives.sum() * positives.sum()))
    assert abs(h.roc_auc() - roc_auc_score(t, p)) <= bound + 1e-12
    # Average precision has no such clean bound; merging probabilities within 1e-4 into ties changes the
    # precision at a handful of recall steps by O(1/n): observed ~4e-5 on these 45,000 pixels, so 1e-3.
    assert h.average_precision() == pytest.approx(average_precision_score(t, p), abs=1e-3)


def test_best_f1_threshold_beats_every_grid_threshold():
    probs, target, valid = random_scores(0)
    p, t = probs[valid], target[valid]
    h = ProbabilityHistogram()
    h.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(valid))
    threshold, best = h.best_f1_threshold()
    assert best == pytest.approx(f1_score(t, p > np.float32(threshold)), abs=1e-12)
    for candidate in np.linspace(0, 1, 201):  # a brute-force search on a coarser grid never does better
        pred = p > np.float32(candidate)
        tp, fp, fn = np.sum(pred & (t == 1)), np.sum(pred & (t == 0)), np.sum(~pred & (t == 1))
        assert 2 * tp / (2 * tp + fp + fn) <= best + 1e-12


def test_curves_and_downsampling():
    probs, target, valid = random_scores(1)
    h = ProbabilityHistogram()
    h.update(torch.from_numpy(probs), torch.from_numpy(target), torch.from_numpy(valid))
    fpr, tpr = h.roc_curve()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    x, y = downsample_curve(fpr, tpr, 500)
    assert len(x) <= 500 and (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(y, x) == pytest.approx(h.roc_auc(), abs=1e-3)  # still the same curve
    recall, precision = h.pr_curve()
    assert np.all(np.diff(recall) >= 0) and recall[-1] == 1
    assert precision[-1] == pytest.approx(target[valid].mean())  # threshold 0: everything predicted positive


def test_threshold_must_be_on_the_grid():
    with pytest.raises(ValueError, match="multiple of 1/10000"):
        ProbabilityHistogram().counts_at(0.12345)
