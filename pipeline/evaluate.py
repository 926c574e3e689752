"""Score the trained model on the test split: ``python -m pipeline.evaluate <dataset>``.

Writes ``metrics/<dataset>/eval.json`` (the DVC metrics) and the directory ``metrics/<dataset>/evaluation/``:

* both tasks: ``confusion.json`` (rows = true class, columns = predicted; at threshold 0.5 for binary);
* multiclass: ``eval.json`` holds foreground TP/FP/FN/IoU/Dice, pixel accuracy, mean IoU, per-class scores;
* binary: ``eval.json`` holds counts and scores at threshold 0.5, ROC-AUC, PR-AUC, per-image mean and standard
  deviation, F1 at the threshold chosen on the training images, the second annotator's scores;
  ``evaluation/`` also has ``per_image.csv``, and ``roc.csv`` / ``pr.csv`` for ``dvc plots``.

Only pixels inside the split's field of view (``fov``) count, when it has one. Predictions are accumulated
batch by batch (a confusion matrix, or a probability histogram), so memory does not grow with the test set.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
from torch import nn

from pipeline import params
from pipeline.artifacts import DatasetMeta, DatasetPaths, Split, atomic_path, load_split, write_json
from pipeline.inference import THRESHOLD, load_model, logits_to_labels, predict_batches
from pipeline.metrics import ConfusionMatrix, ProbabilityHistogram, binary_metrics, downsample_curve
from pipeline.runtime import setup

PER_IMAGE_SCORES = ["f1", "iou", "sensitivity", "specificity", "accuracy", "roc_auc"]
CURVE_POINTS = 500  # rows per ROC / PR CSV: plenty for a plot, small for git


def evaluation_dir(paths: DatasetPaths) -> Path:
    return paths.metrics / "evaluation"


def rounded(value):
    """JSON-ready: floats rounded to 6 digits, NaN (a pandas std of one image) as null."""
    if isinstance(value, dict):
        return {key: rounded(v) for key, v in value.items()}
    if isinstance(value, float):
        return round(float(value), 6) if math.isfinite(value) else None
    return value


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ------------------------------------------------------------------------------------------ multiclass


def evaluate_multiclass(model: nn.Module, meta: DatasetMeta, test: Split, batch_size: int, device, out: Path) -> dict:
    confusion = ConfusionMatrix(meta.num_classes)
    for index, logits in predict_batches(model, test.images, batch_size, device):
        fov = None if test.fov is None else test.fov[index]
        confusion.update(test.masks[index], logits_to_labels(logits), fov)
    write_json(out / "confusion.json", {"classes": meta.classes, "matrix": confusion.matrix.tolist()})
    return {**confusion.summary(meta.classes), "images": len(test)}


# ------------------------------------------------------------------------------------------ binary


def image_histograms(model: nn.Module, split: Split, batch_size: int, device) -> Iterator[tuple[int, ProbabilityHistogram]]:
    """``(image index, histogram of its FOV pixels' probabilities)`` for every image of ``split``."""
    for index, logits in predict_batches(model, split.images, batch_size, device):
        probs = torch.sigmoid(logits[:, 0])
        for offset, i in enumerate(range(index.start, index.stop)):
            histogram = ProbabilityHistogram()
            histogram.update(probs[offset], split.masks[i], None if split.fov is None else split.fov[i])
            yield i, histogram


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.round(6).to_csv(tmp, index=False)


def evaluate_binary(
    model: nn.Module, meta: DatasetMeta, train: Split, test: Split, batch_size: int, device, out: Path
) -> dict:
    # The threshold is chosen on the training images, never on test, so the F1 reported at it is honest.
    train_pixels = ProbabilityHistogram()
    for _, histogram in image_histograms(model, train, batch_size, device):
        train_pixels += histogram
    train_threshold, _ = train_pixels.best_f1_threshold()

    test_pixels = ProbabilityHistogram()
    rows = []
    for i, histogram in image_histograms(model, test, batch_size, device):
        test_pixels += histogram
        rows.append({"id": str(test.ids[i]), **histogram.summary(THRESHOLD)})
    per_image = pd.DataFrame(rows)
    scores = per_image[PER_IMAGE_SCORES].astype(float)  # None (undefined for that image) -> NaN, skipped

    results = {
        **test_pixels.summary(THRESHOLD),
        "per_image_mean": scores.mean().to_dict(),
        "per_image_std": scores.std().to_dict(),  # sample standard deviation (ddof=1) over images
        "train_threshold": train_threshold,
        "f1_at_train_threshold": binary_metrics(*test_pixels.counts_at(train_threshold))["f1"],
        "images": len(test),
    }
    if test.reference_masks is not None:
        # The second annotator, scored as if it were a model: the human level to compare the model with.
        human = ConfusionMatrix(2)
        human.update(test.masks, test.reference_masks, test.fov)
        (tn, fp), (fn, tp) = human.matrix.tolist()
        results["human"] = binary_metrics(tp, fp, fn, tn)

    # The same file as for a multiclass task, so that every dataset's evaluate stage has the same outputs.
    tp, fp, fn, tn = test_pixels.counts_at(THRESHOLD)
    write_json(out / "confusion.json", {"classes": meta.classes, "matrix": [[tn, fp], [fn, tp]]})
    write_csv(out / "per_image.csv", per_image)
    fpr, tpr = downsample_curve(*test_pixels.roc_curve(), CURVE_POINTS)
    write_csv(out / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
    recall, precision = downsample_curve(*test_pixels.pr_curve(), CURVE_POINTS)
    write_csv(out / "pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))
    return results


# ------------------------------------------------------------------------------------------ stage


def evaluate(dataset: str) -> dict:
    """Score ``data/models/<dataset>/model.pt`` on the test split; write and return ``eval.json``'s content."""
    paths = DatasetPaths(dataset)
    batch_size = params.load(dataset, "evaluate").batch_size
    device = setup(0)
    model, meta = load_model(paths, device)
    test = load_split(paths.prepared, "test")
    # The detail files form one directory, replaced as a whole, so dvc.yaml declares the same outputs for
    # every dataset whatever files its task writes.
    with atomic_path(evaluation_dir(paths)) as out:
        out.mkdir()
        if meta.task == "binary":
            train = load_split(paths.prepared, "train")
            results = evaluate_binary(model, meta, train, test, batch_size, device, out)
        else:
            results = evaluate_multiclass(model, meta, test, batch_size, device, out)
    results = rounded(results)
    write_json(paths.metrics / "eval.json", results)
    return results


def summary_line(dataset: str, results: dict) -> str:
    if "roc_auc" in results:
        line = (f"F1 {fmt(results['f1'])}, ROC-AUC {fmt(results['roc_auc'])}, PR-AUC {fmt(results['pr_auc'])}; "
                f"F1 {fmt(results['f1_at_train_threshold'])} at the train threshold {results['train_threshold']}")
        if "human" in results:
            line += f"; second annotator F1 {fmt(results['human']['f1'])}"
    else:
        line = (f"foreground IoU {fmt(results['iou'])}, Dice {fmt(results['dice'])}, "
                f"pixel accuracy {fmt(results['accuracy'])}, mean IoU {fmt(results['mean_iou'])}")
    return f"{dataset}: {line} on {results['images']} test images -> {DatasetPaths(dataset).metrics / 'eval.json'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description="Score the trained model on the test split.")
    parser.add_argument("dataset", help="a dataset with data/prepared/<dataset>/ and data/models/<dataset>/model.pt")
    args = parser.parse_args(argv)
    try:
        results = evaluate(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    print(summary_line(args.dataset, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
