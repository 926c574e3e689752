"""Score the trained model on the test split and release it: ``python -m pipeline.evaluate <dataset>``.

Writes ``metrics/<dataset>/eval.json`` (the headline: foreground Dice, IoU, TP / FP / FN, ROC-AUC, PR-AUC; a
binary task adds the second annotator's Dice and the training images' best threshold), ``evaluation.json``
(per class, per image, every score, the confusion matrix), ``roc.csv`` and ``pr.csv``, and
``data/models/<dataset>/release.pt``: train's model file with the operating point it was scored at (threshold,
test-time augmentation, batch size) and the headline, which render and predict use. A binary pixel is positive
above ``<dataset>.evaluate.threshold``: a branch can move the operating point without retraining. The scoring is
pipeline/scoring.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.atomic import write_json
from pipeline.checkpoint import Evaluation, check_input_channels, load_model, release_path, save_release
from pipeline.inference import TTA
from pipeline.params import load_params, require
from pipeline.prepared import open_split
from pipeline.runtime import setup
from pipeline.scoring import evaluate_binary, evaluate_multiclass, rounded, write_curves
from pipeline.stage import DatasetPaths, run


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    # A binary task's operating point: a pixel is positive when its probability is above it. Render draws and
    # predict predicts at the same threshold (release.pt carries it). Multiclass tasks take the most probable class.
    threshold: float = 0.5
    # Test-time augmentation (pipeline.inference.TTA): "none", "flips" or "dihedral" (flips and quarter turns),
    # probabilities averaged over the views. Only symmetries the training augmentation taught the model pay:
    # STARE's vessels have no orientation, MNIST's digits do (a 6 turned is a 9).
    tta: str = "none"

    def validate(self, key: str) -> None:
        require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        require(0 < self.threshold < 1, f"{key}.threshold", f"must be in (0, 1), got {self.threshold}")
        require(self.tta in TTA, f"{key}.tta", f"must be one of {list(TTA)}, got {self.tta!r}")


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
    if meta.task == "binary":
        train = open_split(paths.prepared, "train")
        headline, detail, pixels = evaluate_binary(
            model, meta, train, test, settings.batch_size, settings.threshold, device, settings.tta
        )
    else:
        headline, detail, pixels = evaluate_multiclass(model, meta, test, settings.batch_size, device, settings.tta)
    write_curves(paths.metrics, pixels)
    write_json(paths.evaluation, rounded(detail))
    headline = rounded(headline)
    operating_point = Evaluation(float(settings.threshold), settings.tta, settings.batch_size, headline)
    save_release(release_path(paths), model_file, operating_point)
    write_json(paths.metrics / "eval.json", headline)  # last: the headline appears only when all else is written
    return headline


def summary_line(dataset: str, headline: dict) -> str:
    line = (
        f"Dice {fmt(headline['dice'])}, IoU {fmt(headline['iou'])}, ROC-AUC {fmt(headline['roc_auc'])}, "
        f"PR-AUC {fmt(headline['pr_auc'])}"
    )
    if "train_threshold" in headline:
        line += f"; the training images' best threshold {headline['train_threshold']}"
    if "human_dice" in headline:
        line += f"; second annotator Dice {fmt(headline['human_dice'])}"
    return f"evaluate {dataset}: {line} -> {DatasetPaths(dataset).metrics / 'eval.json'}"


def evaluate_stage(dataset: str) -> str:
    return summary_line(dataset, evaluate(dataset))


if __name__ == "__main__":
    run(evaluate_stage)
