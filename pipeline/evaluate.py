"""Score the trained model on the test split and release it: ``python -m pipeline.evaluate <dataset>``.

Writes ``metrics/<dataset>/eval.json`` (the headline), ``evaluation.json`` (every score, the confusion matrix),
``roc.csv``, ``pr.csv`` and ``data/models/<dataset>/release.pt``: train's model file with the operating point it
was scored at, which render and predict use. Outputs and scoring: docs/inference.md, pipeline/scoring.py.
"""

from __future__ import annotations

from pipeline.stage import answer_help

answer_help(__name__, __doc__)  # before the imports below load torch

from dataclasses import dataclass

from pipeline.atomic import write_json
from pipeline.checkpoint import Evaluation, check_input_channels, load_model, release_path, save_release
from pipeline.inference import TTA
from pipeline.params import load_params, require
from pipeline.prepared import open_split
from pipeline.runtime import setup
from pipeline.scoring import SCORERS, rounded, write_curves
from pipeline.stage import DatasetPaths, run


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    # A binary pixel is positive above it; moving it needs no retraining. "train": the threshold with the best
    # Dice on the training images (never the test images), which follows the model's own calibration.
    threshold: float | str = 0.5
    tta: str = "none"  # pipeline.inference.TTA: only symmetries the training augmentation taught pay

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        ok = self.threshold == "train" or (not isinstance(self.threshold, str) and 0 < self.threshold < 1)
        require(ok, f"{key}.threshold", f"must be in (0, 1) or 'train', got {self.threshold!r}")
        require(self.tta in TTA, f"{key}.tta", f"must be one of {list(TTA)}, got {self.tta!r}")


SHOWN = {"dice": "Dice", "iou": "IoU", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}  # evaluate_stage's line


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def evaluate(dataset: str) -> dict:
    """Score ``data/models/<dataset>/model.pt`` on the test split; write the outputs, return the headline."""
    paths = DatasetPaths(dataset)
    settings = load_params(dataset, "evaluate", EvaluateParams)
    device = setup(0)
    model_file, model = load_model(paths, device)
    meta = model_file.plan.meta
    test = open_split(paths.prepared, "test")
    check_input_channels(model_file, test.channels, test.where)
    headline, detail, pixels = SCORERS[meta.task](model, meta, paths.prepared, test, settings, device)
    write_curves(paths.metrics, pixels)
    write_json(paths.evaluation, rounded(detail))
    headline = rounded(headline)
    threshold = detail["scores"].get("threshold", 0.5)  # a binary task's, resolved; a multiclass one has none
    operating_point = Evaluation(float(threshold), settings.tta, settings.batch_size, headline)
    save_release(release_path(paths), model_file, operating_point)
    write_json(paths.metrics / "eval.json", headline)  # last: the headline appears only when all else is written
    return headline


def evaluate_stage(dataset: str) -> str:
    headline = evaluate(dataset)
    line = ", ".join(f"{name} {fmt(headline[key])}" for key, name in SHOWN.items())
    if "train_threshold" in headline:
        line += f"; the training images' best threshold {headline['train_threshold']}"
    if "human_dice" in headline:
        line += f"; second annotator Dice {fmt(headline['human_dice'])}"
    return f"evaluate {dataset}: {line} -> {DatasetPaths(dataset).metrics / 'eval.json'}"


if __name__ == "__main__":
    run(evaluate_stage)
