"""README's "Extend it": a dataset kind, an architecture, a loss and a class score, each registered as the
README shows, run together through the prepare, train and evaluate stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import confusion, evaluate, losses, models, prepare, train
from pipeline.checkpoint import load_checkpoint
from pipeline.confusion import ratio
from pipeline.params import require
from pipeline.plans import Plan, Source
from pipeline.prepared import DatasetMeta, Sample

SIZE = 32


# ---------------------------------------------------------------- a dataset kind: pipeline/datasets/squares.py
@dataclasses.dataclass(frozen=True)
class SquaresParams:
    images: int = 10

    def validate(self, key: str) -> None:
        require(self.images >= 4, f"{key}.images", f"must be >= 4, got {self.images}")


def square(source: Source) -> Sample:
    """A gray square on noise; the mask is the square."""
    rng = np.random.default_rng(source.payload)
    image = rng.integers(0, 100, (SIZE, SIZE, 3), dtype=np.uint8)
    top, left = rng.integers(2, SIZE // 2, 2)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[top : top + 12, left : left + 12] = 1
    image[mask == 1] += 120
    return Sample(source.id, image, mask)


def squares_plan(raw_dir: Path, params: SquaresParams) -> Plan:
    ids = [f"sq{i:03d}" for i in range(params.images)]
    sources = [Source(id_, hashlib.sha256(id_.encode()).hexdigest(), i) for i, id_ in enumerate(ids)]
    return Plan(
        meta=DatasetMeta("squares", "binary", ["background", "square"], [[0, 0, 0], [255, 0, 0]]),
        splits={"train": sources[:-3], "val": [], "test": sources[-3:]},
        decode=lambda chunk: [square(source) for source in chunk],
        tally=lambda samples: {"pixels": np.bincount(np.concatenate([s.mask.ravel() for s in samples]), minlength=2)},
        summarize=lambda tallies, written: {"squares": sum(len(split) for split in written.values())},
    )


SQUARES = types.SimpleNamespace(VERSION=1, PrepareParams=SquaresParams, plan=squares_plan)


# ---------------------------------------------------------- an architecture: pipeline/architectures/<name>.py
class TwoConvolutions(torch.nn.Module):
    size_multiple = 1

    def __init__(self, in_channels: int, out_channels: int, width: int = 4):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


# ---------------------------------------------------------------------------- a loss: in pipeline/losses.py
class MeanAbsoluteError(losses.Loss):
    """|sigmoid(logit) - target| over the pixels that count: sums that add up over ranks and tiles."""

    def sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = target != losses.IGNORE
        error = (torch.sigmoid(logits[:, 0]) - target.float()).abs()
        return torch.stack([error[valid].sum(), valid.sum().to(error.dtype)])

    def from_sums(self, sums: torch.Tensor) -> torch.Tensor:
        return sums[0] / sums[1].clamp(min=1)


def test_a_new_kind_architecture_loss_and_score_run_through_the_stages(tmp_path, monkeypatch, capsys):
    # Each one's registration: the line it adds to its registry.
    monkeypatch.setitem(sys.modules, "pipeline.datasets.squares", SQUARES)
    monkeypatch.setattr(prepare, "KINDS", (*prepare.KINDS, "squares"))
    monkeypatch.setitem(models.ARCHITECTURES, "two_convolutions", TwoConvolutions)
    monkeypatch.setitem(losses.LOSSES, "mae", {"binary": MeanAbsoluteError()})
    monkeypatch.setitem(confusion.CLASS_SCORES, "precision", lambda tp, fp, fn: ratio(tp, tp + fp))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw/squares").mkdir(parents=True)
    section = {
        "prepare": {"images": 10},
        "train": {"arch": "two_convolutions", "width": 4, "epochs": 2, "batch_size": 4, "lr": 0.05, "loss": "mae"},
        "evaluate": {"batch_size": 4},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": {"squares": "squares"}, "squares": section}))

    assert prepare.prepare("squares").startswith("prepare squares: train 7, val 0, test 3 images (10 decoded")
    assert json.loads((tmp_path / "metrics/squares/data.json").read_text())["squares"] == 10
    train.train("squares")
    out = capsys.readouterr().out
    assert "train squares: two_convolutions width 4, 149 parameters" in out, out
    curves = json.loads((tmp_path / "metrics/squares/train/metrics.json").read_text())
    assert 0 < curves["train_loss"] < 1, curves  # a mean absolute error of probabilities
    evaluate.evaluate_stage("squares")

    evaluation = json.loads((tmp_path / "metrics/squares/evaluation.json").read_text())
    for record in evaluation["classes"]:
        assert set(record) >= {"class", "tp", "fp", "fn", "iou", "dice", "precision"}, record
        assert record["precision"] == ratio(record["tp"], record["tp"] + record["fp"])
    model, meta = load_checkpoint(tmp_path / "data/models/squares/release.pt")
    assert isinstance(model, TwoConvolutions) and meta.classes == ["background", "square"]
