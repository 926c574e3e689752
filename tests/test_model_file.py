"""The model file alone: train's and evaluate's files carry their plan and operating point, so that
``python -m pipeline.predict --model FILE`` predicts in any directory, as predict does inside the project; a
malformed file is one line naming it; ``--help`` answers without torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import predict
from pipeline.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
)
from pipeline.inference import TTA
from pipeline.models import build_model
from pipeline.prepared import DatasetMeta, Sample, write_samples
from tests.test_stage_runner import help_of

REPO = Path(__file__).resolve().parents[1]
META = DatasetMeta("toy", "binary", ["background", "thing"], [[0, 0, 0], [255, 0, 0]], scale=0.5)
CONFIG = {"arch": "simple_unet", "in_channels": 3, "out_channels": 1, "width": 4}


def command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m pipeline.<args>`` as a user runs it in ``cwd``: the installed package, no PYTHONPATH."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def trained_project(root: Path) -> None:
    """A tiny binary dataset prepared at scale 0.5 (as a folder dataset with prepare.scale 0.5 is), trained
    and evaluated by the stages themselves."""
    rng = np.random.default_rng(0)

    def samples(prefix: str, n: int) -> list[Sample]:
        images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        return [Sample(f"{prefix}{i}", image, (image[..., 0] > 128).astype(np.uint8)) for i, image in enumerate(images)]

    write_samples(
        root / "data/prepared/toy", META, {"train": samples("a", 16), "val": samples("b", 4), "test": samples("c", 4)}
    )
    train = {"arch": "simple_unet", "width": 4, "epochs": 1, "batch_size": 8, "lr": 0.01, "loss": "bce_dice"}
    sections = {"train": train, "evaluate": {"batch_size": 4, "threshold": 0.4}}
    (root / "params.yaml").write_text(yaml.safe_dump({"toy": sections}))
    ok(command("pipeline.train", "toy", cwd=root))
    ok(command("pipeline.evaluate", "toy", cwd=root))


def write_inputs(directory: Path) -> None:
    rng = np.random.default_rng(1)
    directory.mkdir()
    for name, (h, w) in {"one": (30, 34), "two": (30, 34), "three": (50, 41)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / f"{name}.png")
    Image.fromarray(rng.integers(0, 65536, (21, 27), dtype=np.uint16)).save(directory / "deep.png")  # 16-bit gray


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_a_model_file_copied_alone_predicts_as_predict_does_in_the_project(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    trained_project(project)
    write_inputs(project / "in")
    release = load_model_file(project / "data/models/toy/release.pt", "evaluate")
    assert release.plan.meta.scale == 0.5 and release.plan.input_channels == 3 and release.plan.pad_multiple == 4
    assert (release.evaluation.threshold, release.evaluation.tta, release.evaluation.batch_size) == (0.4, "none", 4)
    assert release.evaluation.metrics == json.loads((project / "metrics/toy/eval.json").read_text())

    inside = ok(command("pipeline.predict", "toy", "in", "--out", "out", cwd=project))
    assert inside.startswith("predict toy: 4 images in ")
    shutil.copy(project / "data/models/toy/release.pt", elsewhere / "stare-vessels.pt")
    assert [p.name for p in elsewhere.iterdir()] == ["stare-vessels.pt"]  # no params.yaml, no data/, no .dvc
    alone = command(
        "pipeline.predict", "--model", "stare-vessels.pt", str(project / "in"), "--out", "out", cwd=elsewhere
    )
    assert ok(alone).startswith("predict: 4 images in ")
    predicted = files(elsewhere / "out")
    assert sorted(predicted) == sorted(
        f"{stem}{suffix}"
        for stem in ("deep", "one", "three", "two")
        for suffix in (".png", "_prob.png", "_overlay.jpg")
    )
    assert predicted == files(project / "out")  # labels, probabilities and overlays, byte for byte
    for stem, size in {"one": (34, 30), "three": (41, 50), "deep": (27, 21)}.items():
        with Image.open(elsewhere / "out" / f"{stem}.png") as labels:
            assert labels.mode == "P" and labels.size == size  # back at the input's own size

    # The plan's scale is what was used: at scale 1 the same model predicts otherwise.
    ok(command("pipeline.predict", "--model", "stare-vessels.pt", str(project / "in"), "--out", "unscaled",
               "--scale", "1", cwd=elsewhere))  # fmt: skip
    assert files(elsewhere / "unscaled")["three_prob.png"] != predicted["three_prob.png"]


# ------------------------------------------------------------------------------------------ malformed files


@pytest.fixture(autouse=True)
def repeatable_setup(monkeypatch):
    # runtime.setup runs once per process in real use; torch refuses to set the inter-op thread count again.
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    """An untrained model file alone in an empty directory, and an image beside it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint("model.pt", CONFIG, build_model(CONFIG).state_dict(), META)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save("in.png")
    return tmp_path / "model.pt"


def rewritten(path: Path, change) -> None:
    saved = torch.load(path, weights_only=True)
    change(saved)
    torch.save(saved, path)


def without(key: str):
    return lambda part: part.pop(key)


MALFORMED = {
    "no-plan": (
        without("plan"),
        "expected a mapping of format, model, plan, state_dict (and evaluation); got ['format', 'model', 'state_dict']",
    ),
    "plan-key": (
        lambda saved: without("pad_multiple")(saved["plan"]),
        "'plan' must be a mapping of dataset, task, classes, colors, scale, input_channels, normalization, "
        "pad_multiple; got",
    ),
    "task": (lambda saved: saved["plan"].update(task="regression"), "plan: task must be one of"),
    "colors": (lambda saved: saved["plan"].update(colors=[[0, 0, 0]]), "plan: need one RGB colour per class"),
    "scale": (lambda saved: saved["plan"].update(scale=float("nan")), "plan: scale must be a number in (0, 16]"),
    "name": (lambda saved: saved["plan"].update(dataset="../x"), "plan dataset: '../x' is not a dataset name"),
    "channels": (lambda saved: saved["plan"].update(input_channels="3"), "plan input_channels must be an integer"),
    "normalization": (
        lambda saved: saved["plan"].update(normalization={"mean": [0.5] * 3, "std": [0.25] * 3}),
        "plan normalization {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]} is not one this segpipe applies",
    ),
    "multiple": (
        lambda saved: saved["plan"].update(pad_multiple=16),
        "the plan (input_channels 3, pad_multiple 16) does not fit the network (in_channels 3, size multiple 4)",
    ),
    "plan-channels": (
        lambda saved: saved["plan"].update(input_channels=1, normalization={"mean": [0.0], "std": [255.0]}),
        "the plan (input_channels 1, pad_multiple 4) does not fit the network (in_channels 3, size multiple 4)",
    ),
    "format": (
        lambda saved: saved.update(format="segpipe-model/9"),
        f"format 'segpipe-model/9'; this segpipe reads {FORMAT}",
    ),
    "evaluation": (
        lambda saved: saved.update(evaluation={"threshold": 0.5, "tta": "rotations", "batch_size": 1, "metrics": {}}),
        "evaluation tta must be one of ['none', 'flips', 'dihedral'], got 'rotations'",
    ),
    "earlier": (
        lambda saved: [saved.pop("format"), saved.pop("plan"), saved.update(dataset={})],
        "written by an earlier segpipe, without a plan; run the train stage again",
    ),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_a_malformed_model_file_is_one_line_naming_it(model_file, capsys, damage):
    change, message = MALFORMED[damage]
    rewritten(model_file, change)
    with pytest.raises(CheckpointError) as refused:
        load_model_file(model_file).build()
    assert str(refused.value).startswith(f"{model_file}: ") and message in str(refused.value)
    assert predict.main(["--model", "model.pt", "in.png", "--out", "out"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("predict: error: model.pt: ") and message in err, err
    assert not Path("out").exists()


def test_an_untouched_model_file_predicts(model_file, capsys):
    assert predict.main(["--model", "model.pt", "in.png", "--out", "out"]) == 0
    assert capsys.readouterr().out.startswith("predict: 1 images in ")
    assert sorted(p.name for p in Path("out").iterdir()) == ["in.png", "in_overlay.jpg", "in_prob.png"]


@pytest.mark.parametrize(
    "config",
    [
        {**CONFIG, "note": "an extra setting"},
        {key: value for key, value in CONFIG.items() if key != "width"},
        {**CONFIG, "width": 300},
    ],
    ids=["extra-key", "no-width", "too-wide"],
)
def test_any_config_build_model_takes_is_accepted_and_any_other_refused(model_file, config):
    """Not exactly four keys: whatever build_model builds (the values MODEL_LIMITS lists within bounds)."""
    rewritten(model_file, lambda saved: saved.update(model=config))
    try:
        built = build_model(config) if config.get("width", 0) <= 256 else None
    except (KeyError, TypeError, ValueError):
        built = None
    if built is None:
        with pytest.raises(CheckpointError, match=f"^{model_file}: "):
            load_checkpoint(model_file)
    else:
        model, _ = load_checkpoint(model_file)
        assert type(model) is type(built)


# ------------------------------------------------------------------------------------------ the command line


def test_help_is_plain_text_and_imports_no_torch():
    text, imported = help_of("predict")
    assert imported == []  # not even numpy, PIL or matplotlib
    assert "--model FILE" in text and "DATASET" in text and "``" not in text and ":func:" not in text


def test_the_command_lines_tta_choices_are_inferences():
    assert predict.TTA_NAMES == tuple(TTA)
