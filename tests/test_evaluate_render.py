"""evaluate and render end to end on tiny random datasets and untrained models, checked against recomputation;
evaluate's release (the model file with its operating point), which render draws at."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from pipeline import evaluate, figures, render, scoring, viz
from pipeline.checkpoint import Evaluation, load_checkpoint, load_model_file, save_checkpoint, save_release
from pipeline.inference import logits_to_labels, predict_batches
from pipeline.models import build_model
from pipeline.prepared import DatasetMeta, PreparedDataError, Sample, Split, load_split, save_prepared, write_samples
from pipeline.runtime import setup
from pipeline.stage import main as run_stage
from tests.synthetic import finished_pid

BATCH_SIZE, GRID, ALPHA, SCALE = 8, 3, 0.5, 2


@pytest.fixture(autouse=True)
def repeatable_setup(monkeypatch):
    # runtime.setup runs once per stage process; torch refuses to set the inter-op thread count again after
    # any parallel work, which these tests do between stages run in one process.
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)


def make_dataset(root, name: str, meta: DatasetMeta, splits: dict[str, Split], arch: str) -> None:
    """Prepared data, an untrained checkpoint and params.yaml under ``root``, laid out as the stages expect."""
    save_prepared(root / "data/prepared" / name, meta, splits)
    make_model(root, name, meta, arch, [splits["test"].images])


def make_model(root, name: str, meta: DatasetMeta, arch: str, test_images: list[np.ndarray], **params) -> None:
    """An untrained checkpoint for ``test_images`` (stacks of images of one size each) and params.yaml."""
    torch.manual_seed(0)
    config = {"arch": arch, "in_channels": test_images[0].shape[-1], "out_channels": meta.model_outputs, "width": 4}
    model = build_model(config).eval()
    # Freshly initialised, the network predicts one class everywhere, which would leave most counts at 0.
    # A louder head, centred on the median logit, makes it predict every class somewhere.
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=3.0)
        logits = torch.cat(
            [
                logits.transpose(0, 1).flatten(1)
                for images in test_images
                for _, logits in predict_batches(model, images, BATCH_SIZE, "cpu")
            ],
            dim=1,
        )
        model.head.bias -= logits.median(dim=1).values
    save_checkpoint(root / "data/models" / name / "model.pt", config, model.state_dict(), meta)
    sections = {
        name: {"evaluate": {"batch_size": BATCH_SIZE}, "render": {"grid": GRID, "alpha": ALPHA, "scale": SCALE}}
    }
    for stage, section in params.items():
        sections[name][stage].update(section)
    (root / "params.yaml").write_text(yaml.safe_dump(sections))


@pytest.fixture
def multiclass(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    classes = ["background"] + [f"digit {d}" for d in range(10)]
    colors = [[0, 0, 0]] + rng.integers(0, 256, (10, 3)).tolist()

    def split(n: int, name: str) -> Split:  # an id names one image of the whole dataset
        masks = np.where(rng.random((n, 28, 28)) < 0.7, 0, rng.integers(1, 11, (n, 28, 28))).astype(np.uint8)
        return Split(
            rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), masks, np.array([f"{name}{i:02d}" for i in range(n)])
        )

    meta = DatasetMeta("toy", "multiclass", classes, colors)
    make_dataset(
        tmp_path,
        "toy",
        meta,
        {"train": split(4, "train"), "val": split(4, "val"), "test": split(20, "test")},
        "simple_unet",
    )
    monkeypatch.chdir(tmp_path)
    return meta


@pytest.fixture
def binary(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:40, :48]
    fov = ((yy - 20) / 19) ** 2 + ((xx - 24) / 23) ** 2 <= 1  # an elliptical field of view, as on a fundus photo

    def split(n: int, name: str) -> Split:
        masks = (rng.random((n, 40, 48)) < 0.2).astype(np.uint8)
        # The second annotator agrees on ~90 % of pixels.
        reference = np.where(rng.random(masks.shape) < 0.9, masks, 1 - masks).astype(np.uint8)
        images = rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8)
        ids = np.array([f"{name}{i:04d}" for i in range(n)])
        return Split(images, masks, ids, np.repeat(fov[None], n, 0), reference)

    meta = DatasetMeta("eye", "binary", ["background", "vessel"], [[0, 0, 0], [255, 255, 255]])
    make_dataset(
        tmp_path,
        "eye",
        meta,
        {"train": split(3, "train"), "val": split(3, "val"), "test": split(3, "test")},
        "vgg_unet",
    )
    monkeypatch.chdir(tmp_path)
    return meta


def predictions(name: str, split: Split) -> torch.Tensor:
    """The model's logits on ``split``, recomputed here the way any user of the checkpoint would."""
    device = setup(0)  # the device evaluate runs on: a GPU's convolutions round differently
    model, _ = load_checkpoint(f"data/models/{name}/model.pt", device)
    return torch.cat([logits for _, logits in predict_batches(model, split.images, BATCH_SIZE, device)])


def check_probability_picture(path: Path, fov: np.ndarray, scale: int) -> None:
    """The map pixel for pixel, its colour bar below; grey outside the field of view, coloured inside."""
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    h, w = fov.shape
    assert picture.shape[1] == w * scale and picture.shape[0] > h * scale
    top, inside = picture[: h * scale], viz.upscale(fov, scale)
    if (~inside).any():
        assert np.median(np.abs(top[~inside] - 128)) <= 3  # matplotlib's "0.5" grey, within JPEG's error
    spread = top[inside].max(axis=1) - top[inside].min(axis=1)  # magma is never grey
    assert np.median(spread) > 10


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()  # decodes the whole file, not just the header
        return image.size


# ------------------------------------------------------------------------------------------ multiclass


def test_multiclass_evaluate_then_render(multiclass, tmp_path, capsys):
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 0
    assert "evaluate toy: Dice" in capsys.readouterr().out

    headline = json.loads((tmp_path / "metrics/toy/eval.json").read_text())
    assert list(headline) == ["dice", "iou", "tp", "fp", "fn", "roc_auc", "pr_auc"]
    detail = json.loads((tmp_path / "metrics/toy/evaluation.json").read_text())
    assert list(detail) == ["classes", "scores", "confusion"]  # the per-class list first: dvc plots draws it
    assert [c["class"] for c in detail["classes"]] == multiclass.classes
    assert all(set(c) == {"class", "tp", "fp", "fn", "iou", "dice", "hd95", "nsd"} for c in detail["classes"])
    results = detail["scores"]
    assert {k: results[k] for k in headline} == headline
    assert results["images"] == 20

    test = load_split("data/prepared/toy", "test")
    target = test.masks.astype(np.int64)
    pred = logits_to_labels(predictions("toy", test)).numpy().astype(np.int64)
    wrong = pred != target
    assert results["tp"] + results["fn"] == int((target != 0).sum())
    assert results["tp"] == int(((pred == target) & (target != 0)).sum())
    assert results["fp"] == int((wrong & (pred != 0)).sum())  # a wrong digit is an FP for the predicted one...
    assert results["fn"] == int((wrong & (target != 0)).sum())  # ...and an FN for the true one
    assert results["accuracy"] == pytest.approx((~wrong).mean(), abs=1e-6)
    t, p, f = results["tp"], results["fp"], results["fn"]
    assert results["iou"] == pytest.approx(t / (t + p + f), abs=1e-6)

    # Foreground (any digit) against background, exactly as scikit-learn scores it.
    foreground = 1 - torch.softmax(predictions("toy", test), dim=1)[:, 0].numpy()
    assert results["roc_auc"] == pytest.approx(roc_auc_score(target.ravel() > 0, foreground.ravel()), abs=1e-6)
    assert results["pr_auc"] == pytest.approx(average_precision_score(target.ravel() > 0, foreground.ravel()), abs=1e-6)

    confusion = detail["confusion"]
    assert confusion["classes"] == multiclass.classes
    expected = np.zeros((11, 11), np.int64)
    np.add.at(expected, (target.ravel(), pred.ravel()), 1)
    assert confusion["matrix"] == expected.tolist()

    killed = tmp_path / f"metrics/toy/.render.tmp-{finished_pid()}-k1ll3d/render"  # what a killed render left
    killed.mkdir(parents=True)
    (killed / "overlay_grid.png").write_bytes(b"half a picture")
    assert run_stage(render.render, ["toy"]) == 0
    out = tmp_path / "metrics/toy/render"
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "error_grid.png", "overlay_grid.png"]
    for name in ("overlay_grid.png", "error_grid.png"):
        width, height = png_size(out / name)
        assert width == GRID * 28 * SCALE and height > GRID * 28 * SCALE  # the mosaic, then the legend below
    assert min(png_size(out / "confusion.png")) > 200

    # The first tile of the mosaic is, pixel for pixel, the first image coloured by its prediction.
    with Image.open(out / "overlay_grid.png") as picture:
        drawn = np.asarray(picture.convert("RGB"))
    coloured = viz.overlay(viz.to_rgb(test.images[0]), pred[0], multiclass.colors, ALPHA)
    inner = slice(0, 28 * SCALE - 2)  # clear of the thin lines drawn between tiles
    np.testing.assert_array_equal(drawn[inner, inner], viz.upscale(coloured, SCALE)[inner, inner])
    assert not list(tmp_path.glob("metrics/toy/.render.tmp-*"))  # neither the killed render's temporary nor this one's


def test_overlay_blends_class_colours_over_gray():
    gray = np.array([[10, 200], [90, 255]], dtype=np.uint8)
    image = np.repeat(gray[..., None], 3, axis=-1)
    labels = np.array([[0, 1], [2, 2]], dtype=np.uint8)
    colors = [[0, 0, 0], [255, 0, 0], [0, 128, 255]]
    out = viz.overlay(image, labels, colors, alpha=0.25)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == [10, 10, 10]  # background: the image itself
    for y, x in [(0, 1), (1, 0), (1, 1)]:
        expected = 0.25 * np.array(colors[labels[y, x]]) + 0.75 * gray[y, x]
        np.testing.assert_allclose(out[y, x], expected, atol=0.5)  # rounded to the nearest uint8


def test_error_map_and_mosaic():
    image = np.full((2, 2, 3), 200, np.uint8)
    target = np.array([[0, 3], [3, 0]])
    pred = np.array([[0, 3], [1, 2]])
    out = viz.error_map(image, target, pred)
    assert out[0, 0].tolist() == [60, 60, 60]  # correct background, dimmed
    assert out[0, 1].tolist() == list(viz.ERROR_COLORS["correct"])
    assert out[1, 0].tolist() == out[1, 1].tolist() == list(viz.ERROR_COLORS["wrong"])

    tiles = np.arange(3 * 2 * 2).reshape(3, 2, 2)
    grid = viz.mosaic(tiles, 2)
    assert grid.shape == (4, 4)
    np.testing.assert_array_equal(grid[:2, 2:], tiles[1])
    np.testing.assert_array_equal(grid[2:, :2], tiles[2])
    assert not grid[2:, 2:].any()  # a missing tile is black


# ------------------------------------------------------------------------------------------ binary


BINARY_SCORES = (
    *("tp", "fp", "fn", "tn", "dice", "iou", "sensitivity", "specificity", "accuracy", "roc_auc", "pr_auc"),
    *("per_image_mean", "per_image_std", "train_threshold", "dice_at_train_threshold", "human", "threshold"),
)


def test_binary_evaluate_then_render(binary, tmp_path):
    headline = evaluate.evaluate("eye")
    assert headline == json.loads((tmp_path / "metrics/eye/eval.json").read_text())
    headline_keys = ["dice", "iou", "tp", "fp", "fn", "roc_auc", "pr_auc", "human_dice"]
    assert list(headline) == [*headline_keys, "train_threshold"]
    detail = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())
    assert list(detail) == ["classes", "images", "scores", "confusion"]
    results = detail["scores"]
    assert {k: results[k] for k in headline if k != "human_dice"} == {
        k: v for k, v in headline.items() if k != "human_dice"
    }
    assert headline["human_dice"] == results["human"]["dice"]
    for key in BINARY_SCORES:
        assert key in results, key
    assert results["threshold"] == 0.5
    scores = {"dice", "iou", "sensitivity", "specificity", "accuracy", "roc_auc"}
    assert set(results["per_image_mean"]) == set(results["per_image_std"]) == scores

    test = load_split("data/prepared/eye", "test")
    fov, target = test.fov, test.masks.astype(bool)
    probs = torch.sigmoid(predictions("eye", test)[:, 0]).numpy()
    pred = probs > 0.5
    assert results["tp"] + results["fp"] + results["fn"] + results["tn"] == int(fov.sum())  # FOV pixels only
    assert results["tp"] + results["fn"] == int((target & fov).sum())
    assert results["tp"] == int((pred & target & fov).sum())
    assert results["fp"] == int((pred & ~target & fov).sum())
    assert results["dice"] == pytest.approx(f1_score(target[fov], pred[fov]), abs=1e-6)
    assert results["roc_auc"] == pytest.approx(roc_auc_score(target[fov], probs[fov]), abs=1e-6)
    assert results["pr_auc"] == pytest.approx(average_precision_score(target[fov], probs[fov]), abs=1e-6)
    assert 0 <= results["train_threshold"] <= 1
    f1_train = f1_score(target[fov], probs[fov] > np.float32(results["train_threshold"]))
    assert results["dice_at_train_threshold"] == pytest.approx(f1_train, abs=1e-6)
    assert results["human"]["dice"] == pytest.approx(f1_score(target[fov], test.reference_masks[fov]), abs=1e-6)

    per_image = pd.DataFrame.from_dict(detail["images"], orient="index")
    assert per_image.index.tolist() == test.ids.tolist()
    assert per_image["dice"].mean() == pytest.approx(results["per_image_mean"]["dice"], abs=1e-5)
    roc, pr = pd.read_csv(tmp_path / "metrics/eye/roc.csv"), pd.read_csv(tmp_path / "metrics/eye/pr.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and list(pr.columns) == ["recall", "precision"]
    assert 2 <= len(roc) <= 500 and 1 <= len(pr) <= 500
    assert detail["confusion"]["matrix"] == [[results["tn"], results["fp"]], [results["fn"], results["tp"]]]
    assert [c["class"] for c in detail["classes"]] == ["background", "vessel"]
    assert detail["classes"][1]["dice"] == results["dice"]

    assert run_stage(render.render, ["eye"]) == 0
    metrics = tmp_path / "metrics/eye"
    for i in test.ids:
        width, height = png_size(metrics / "render/overlays" / f"{i}.jpg")
        assert width == 48 * SCALE and height > 40 * SCALE  # the photo, then the legend below
    for i, fov in zip(test.ids, test.fov):
        check_probability_picture(metrics / "render/probabilities" / f"{i}.jpg", fov, SCALE)


def test_a_binary_picture_wider_than_max_width_is_drawn_reduced_with_a_full_size_detail(binary, tmp_path):
    """So that dvc plots diff of three revisions fits a screen: the overview shrunk to max_width, and the window of
    that width with the most true vessel inside the field of view drawn pixel for pixel, as the full picture is."""
    evaluate.evaluate("eye")
    assert run_stage(render.render, ["eye"]) == 0  # 48 px at scale 2: 96 wide, under the default max_width
    test = load_split("data/prepared/eye", "test")
    full = {i: np.asarray(Image.open(tmp_path / "metrics/eye/render/overlays" / f"{i}.jpg")) for i in test.ids}
    assert not (tmp_path / "metrics/eye/render/details").exists()

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["eye"]["render"]["max_width"] = 64
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(render.render, ["eye"]) == 0
    for i, mask, fov in zip(test.ids, test.masks, test.fov):
        overview = np.asarray(Image.open(tmp_path / "metrics/eye/render/overlays" / f"{i}.jpg"))
        assert overview.shape[1] == 64 and overview.shape[0] > 40 * 2 * 64 // 96  # photo, then legend
        truth = viz.upscale(mask, SCALE).astype(bool) & viz.upscale(fov, SCALE)
        rows, cols = viz.densest_window(truth, 64)
        detail = np.asarray(Image.open(tmp_path / "metrics/eye/render/details" / f"{i}.jpg")).astype(int)
        assert detail.shape[1] == 64

        def difference(dy: int, dx: int) -> float:  # from the full picture's window moved by (dy, dx)
            crop = full[i][rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx].astype(int)
            return np.abs(detail[: crop.shape[0], : crop.shape[1]] - crop).mean()

        # Random pixels, each picture JPEG'd once: the same window differs by JPEG's noise, a moved one by far more.
        assert difference(0, 0) < 12 and min(difference(0, 1), difference(1, 0)) > 3 * difference(0, 0)
        probability = np.asarray(Image.open(tmp_path / "metrics/eye/render/probabilities" / f"{i}.jpg"))
        assert probability.shape[1] == 64


def test_the_densest_window_holds_the_most_foreground_of_any_window():
    rng = np.random.default_rng(3)
    for h, w, side in [(9, 13, 4), (5, 7, 9), (12, 12, 12), (6, 20, 5)]:
        mask = rng.random((h, w)) < 0.3
        rows, cols = viz.densest_window(mask, side)
        sh, sw = min(side, h), min(side, w)
        assert (rows.stop - rows.start, cols.stop - cols.start) == (sh, sw)
        best = max(mask[y : y + sh, x : x + sw].sum() for y in range(h - sh + 1) for x in range(w - sw + 1))
        assert mask[rows, cols].sum() == best


def test_evaluate_releases_the_trained_model_at_its_operating_point(binary):
    """release.pt: train's weights untouched, its plan, and the operating point and headline evaluate scored."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["eye"]["evaluate"].update(threshold=0.3, tta="flips")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    headline = evaluate.evaluate("eye")
    trained = load_model_file("data/models/eye/model.pt")
    released = load_model_file("data/models/eye/release.pt", "evaluate")
    assert released.evaluation == Evaluation(0.3, "flips", BATCH_SIZE, headline)
    assert (released.config, released.plan) == (trained.config, trained.plan) and trained.evaluation is None
    assert released.state_dict.keys() == trained.state_dict.keys()
    assert all(torch.equal(released.state_dict[k], trained.state_dict[k]) for k in trained.state_dict)
    model, meta = load_checkpoint("data/models/eye/release.pt")  # any reader of a model file reads it
    assert meta == trained.plan.meta and meta.task == "binary" and model.head.out_channels == 1


def test_threshold_train_operates_at_the_training_images_best_threshold(binary, tmp_path):
    """evaluate.threshold: train -- the training images' best Dice threshold becomes the operating point: the
    headline is scored at it, and the release carries it to render and predict."""
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["eye"]["evaluate"]["threshold"] = "train"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    headline = evaluate.evaluate("eye")
    scores = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["scores"]
    assert scores["threshold"] == scores["train_threshold"] == headline["train_threshold"] != 0.5
    assert headline["dice"] == scores["dice_at_train_threshold"]
    released = load_model_file("data/models/eye/release.pt", "evaluate")
    threshold = released.evaluation.threshold  # exact; the JSON files round it to 6 places
    assert threshold == pytest.approx(headline["train_threshold"], abs=1e-6)
    test = load_split("data/prepared/eye", "test")
    probs = torch.sigmoid(predictions("eye", test)[:, 0]).numpy()
    target, fov = test.masks.astype(bool), test.fov
    assert headline["tp"] == int((probs.astype(np.float64) > threshold)[target & fov].sum())


def test_the_operating_threshold_moves_metrics_and_pictures_without_retraining(binary, tmp_path, monkeypatch):
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["eye"]["evaluate"]["threshold"] = 0.3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    headline = evaluate.evaluate("eye")
    test = load_split("data/prepared/eye", "test")
    probs = torch.sigmoid(predictions("eye", test)[:, 0]).numpy()
    target, fov = test.masks.astype(bool), test.fov
    assert headline["tp"] == int((probs > np.float32(0.3))[target & fov].sum())
    assert headline["dice"] == pytest.approx(f1_score(target[fov], probs[fov] > np.float32(0.3)), abs=1e-6)

    drawn_at = []
    original = figures.logits_to_labels
    monkeypatch.setattr(
        figures, "logits_to_labels", lambda logits, threshold: drawn_at.append(threshold) or original(logits, threshold)
    )
    assert run_stage(render.render, ["eye"]) == 0
    assert drawn_at and set(drawn_at) == {0.3}  # the pictures agree with the metrics


def test_test_time_augmentation_moves_metrics_and_pictures_together(binary, tmp_path, monkeypatch):
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["eye"]["evaluate"]["tta"] = "dihedral"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    headline = evaluate.evaluate("eye")
    test = load_split("data/prepared/eye", "test")
    device = setup(0)
    model, _ = load_checkpoint("data/models/eye/model.pt", device)
    probs = torch.sigmoid(
        torch.cat([logits for _, logits in predict_batches(model, test.images, BATCH_SIZE, device, "dihedral")])[:, 0]
    ).numpy()
    target, fov = test.masks.astype(bool), test.fov
    assert headline["tp"] == int((probs > np.float32(0.5))[target & fov].sum())
    assert headline["roc_auc"] == pytest.approx(roc_auc_score(target[fov], probs[fov]), abs=1e-6)
    plain = torch.sigmoid(predictions("eye", test)[:, 0]).numpy()
    assert headline["tp"] != int((plain > np.float32(0.5))[target & fov].sum())  # TTA changed the predictions
    assert json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["scores"]["tta"] == "dihedral"

    used = []
    original = figures.predict_batches
    monkeypatch.setattr(figures, "predict_batches", lambda *args: used.append(args[-1]) or original(*args))
    assert run_stage(render.render, ["eye"]) == 0
    assert used == ["dihedral"]  # the pictures agree with the metrics


def test_an_unknown_tta_names_the_parameter(binary, tmp_path, capsys):
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["eye"]["evaluate"]["tta"] = "rotations"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert run_stage(evaluate.evaluate_stage, ["eye"]) != 0
    assert "eye.evaluate.tta: must be one of ['none', 'flips', 'dihedral'], got 'rotations'" in capsys.readouterr().err


def test_outcome_labels():
    target = np.array([[1, 1, 0, 0, 1]])
    pred = np.array([[1, 0, 1, 0, 1]])
    fov = np.array([[True, True, True, True, False]])
    # TP, FN, FP, TN, and a TP outside the field of view, which is not drawn.
    assert viz.outcome_labels(target, pred, fov).tolist() == [[1, 3, 2, 0, 0]]
    assert list(viz.OUTCOMES)[:3] == ["true positive", "false positive", "false negative"]


# ------------------------------------------------------------------------------------------ images of different sizes


def same_size_batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Runs of consecutive samples of one size, cut into at most ``batch_size``: what can be stacked."""
    runs = [list(run) for _, run in itertools.groupby(samples, key=lambda sample: sample.image.shape)]
    return [run[start : start + batch_size] for run in runs for start in range(0, len(run), batch_size)]


def stacked(samples: list[Sample]) -> list[np.ndarray]:
    """The images of ``samples``, stacked in batches of one size (as make_model takes them)."""
    return [np.stack([sample.image for sample in batch]) for batch in same_size_batches(samples, BATCH_SIZE)]


def by_hand_logits(name: str, samples: list[Sample], batch_size: int) -> list[torch.Tensor]:
    """Each sample's logits, (K, H, W) at its own size, its batch predicted as evaluate's is."""
    device = setup(0)
    model, _ = load_checkpoint(f"data/models/{name}/model.pt", device)
    out = []
    for batch in same_size_batches(samples, batch_size):
        ((_, logits),) = predict_batches(model, np.stack([sample.image for sample in batch]), len(batch), device)
        out += list(logits)
    return out


def recorded_batches(monkeypatch, module) -> list[tuple[int, ...]]:
    """The shapes of the image batches ``module`` predicts, from now on."""
    shapes = []
    original = module.predict_batches
    monkeypatch.setattr(
        module,
        "predict_batches",
        lambda model, images, *rest: shapes.append(images.shape) or original(model, images, *rest),
    )
    return shapes


def elliptic_fov(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) / (h / 2 - 1)) ** 2 + ((xx - w / 2) / (w / 2 - 1)) ** 2 <= 1


def by_hand_outcomes(test: list[Sample], probs: list[np.ndarray]) -> tuple[dict, dict, list[float]]:
    """The model's and the second annotator's TP / FP / FN / TN over the samples' fields of view, pixel by pixel,
    and the model's Dice on each image."""
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    human = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    per_image_dice = []
    for s, prob in zip(test, probs):
        assert prob.shape == s.mask.shape  # predicted at its own size, cropped back from the padding
        target, fov = s.mask.astype(bool), s.fov
        for outcomes, pred in ((counts, prob > 0.5), (human, s.reference.astype(bool))):
            outcomes["tp"] += int((pred & target & fov).sum())
            outcomes["fp"] += int((pred & ~target & fov).sum())
            outcomes["fn"] += int((~pred & target & fov).sum())
            outcomes["tn"] += int((~pred & ~target & fov).sum())
        per_image_dice.append(f1_score(target[fov], prob[fov] > 0.5))
    return counts, human, per_image_dice


def test_binary_images_of_different_sizes_are_each_scored_and_drawn_at_their_own_size(tmp_path, monkeypatch):
    """Test images of 40 x 48 and 35 x 29 (neither a multiple of the VGG U-Net's 16), in batches of 2: evaluate's
    counts are the sums of each image's own, computed here pixel by pixel, and every picture has its image's size."""
    rng = np.random.default_rng(2)

    def sample(name: str, h: int, w: int) -> Sample:
        mask = (rng.random((h, w)) < 0.2).astype(np.uint8)
        reference = np.where(rng.random((h, w)) < 0.9, mask, 1 - mask).astype(np.uint8)
        return Sample(name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mask, elliptic_fov(h, w), reference)

    big, small = (40, 48), (35, 29)
    test = [sample(f"test{i}", *size) for i, size in enumerate([big, big, big, small, small, big])]
    train = [sample(f"train{i}", *size) for i, size in enumerate([big, small, big])]
    meta = DatasetMeta("eye", "binary", ["background", "vessel"], [[0, 0, 0], [255, 255, 255]])
    write_samples(tmp_path / "data/prepared/eye", meta, {"train": train, "test": test})
    make_model(tmp_path, "eye", meta, "vgg_unet", stacked(test), evaluate={"batch_size": 2}, render={"batch_size": 2})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreparedDataError, match="cannot be stacked"):
        load_split("data/prepared/eye", "test")  # what the stages read before: it needs one size

    shapes = recorded_batches(monkeypatch, scoring)
    headline = evaluate.evaluate("eye")
    # The training images (the threshold), then the test images: consecutive images of one size, at most 2.
    assert shapes == [
        (1, *big, 3),
        (1, *small, 3),
        (1, *big, 3),
        (2, *big, 3),
        (1, *big, 3),
        (2, *small, 3),
        (1, *big, 3),
    ]
    results = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["scores"]
    assert results["images"] == 6

    probs = [torch.sigmoid(logits[0]).numpy() for logits in by_hand_logits("eye", test, 2)]
    counts, human, per_image_dice = by_hand_outcomes(test, probs)
    assert {key: results[key] for key in counts} == counts
    assert {key: headline[key] for key in ("tp", "fp", "fn")} == {key: counts[key] for key in ("tp", "fp", "fn")}
    assert sum(counts.values()) == sum(int(s.fov.sum()) for s in test)
    fov_probs = np.concatenate([prob[s.fov] for s, prob in zip(test, probs)])
    fov_target = np.concatenate([s.mask[s.fov] for s in test])
    assert results["roc_auc"] == pytest.approx(roc_auc_score(fov_target, fov_probs), abs=1e-6)
    tp, fp, fn = human["tp"], human["fp"], human["fn"]
    assert results["human"]["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    images = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["images"]
    assert list(images) == [s.id for s in test]
    assert [image["dice"] for image in images.values()] == pytest.approx(per_image_dice, abs=1e-6)

    assert run_stage(render.render, ["eye"]) == 0
    for s in test:
        h, w = s.mask.shape
        width, height = png_size(tmp_path / "metrics/eye/render/overlays" / f"{s.id}.jpg")
        assert width == w * SCALE and height > h * SCALE
        check_probability_picture(tmp_path / "metrics/eye/render/probabilities" / f"{s.id}.jpg", s.fov, SCALE)


def test_a_multiclass_mosaic_of_different_sizes_tiles_them_at_the_largest(tmp_path, monkeypatch):
    """28 x 28 and 18 x 22 digits (the latter padded to the U-Net's multiple of 4 and cropped back): the confusion
    matrix sums each image's own, and the mosaic's tiles are 28 x 28, a smaller image in the top left, black around."""
    rng = np.random.default_rng(3)
    classes = ["background"] + [f"digit {d}" for d in range(10)]
    colors = [[0, 0, 0]] + rng.integers(0, 256, (10, 3)).tolist()

    def sample(name: str, h: int, w: int) -> Sample:
        mask = np.where(rng.random((h, w)) < 0.7, 0, rng.integers(1, 11, (h, w))).astype(np.uint8)
        return Sample(name, rng.integers(0, 256, (h, w, 1), dtype=np.uint8), mask)

    big, small = (28, 28), (18, 22)
    test = [sample(f"test{i}", *size) for i, size in enumerate([big, big, small, big, small])]
    meta = DatasetMeta("toy", "multiclass", classes, colors)
    write_samples(tmp_path / "data/prepared/toy", meta, {"train": [sample("train0", *big)], "test": test})
    make_model(tmp_path, "toy", meta, "simple_unet", stacked(test))
    monkeypatch.chdir(tmp_path)

    shapes = recorded_batches(monkeypatch, scoring)
    evaluate.evaluate("toy")
    assert shapes == [(2, *big, 1), (1, *small, 1), (1, *big, 1), (1, *small, 1)]
    detail = json.loads((tmp_path / "metrics/toy/evaluation.json").read_text())
    assert detail["scores"]["images"] == 5
    preds = [logits_to_labels(logits[None])[0].numpy() for logits in by_hand_logits("toy", test, BATCH_SIZE)]
    expected = np.zeros((11, 11), np.int64)
    for s, pred in zip(test, preds):
        assert pred.shape == s.mask.shape
        np.add.at(expected, (s.mask.ravel().astype(np.int64), pred.ravel().astype(np.int64)), 1)
    assert detail["confusion"]["matrix"] == expected.tolist()

    shapes = recorded_batches(monkeypatch, figures)
    assert run_stage(render.render, ["toy"]) == 0
    assert shapes == [(2, *big, 1), (1, *small, 1), (1, *big, 1), (1, *small, 1)]  # runs of one size, render's batch
    out = tmp_path / "metrics/toy/render"
    width, height = png_size(out / "overlay_grid.png")
    assert width == GRID * 28 * SCALE and height > GRID * 28 * SCALE
    with Image.open(out / "overlay_grid.png") as picture:
        drawn = np.asarray(picture.convert("RGB"))
    tile = 28 * SCALE
    left = 2 * tile  # the third tile, in the first row: an 18 x 22 image
    coloured = viz.upscale(viz.overlay(viz.to_rgb(test[2].image), preds[2], colors, ALPHA), SCALE)
    rows, columns = slice(0, 18 * SCALE - 1), slice(1, 22 * SCALE - 1)  # clear of the lines between tiles
    np.testing.assert_array_equal(drawn[rows, left:][:, columns], coloured[rows, columns])
    assert not drawn[: tile - 2, left + 22 * SCALE + 1 : left + tile - 2].any()  # padded: black to its right...
    assert not drawn[18 * SCALE + 1 : tile - 2, left + 2 : left + tile - 2].any()  # ...and below


# ------------------------------------------------------------------------------------------ bad input


def test_missing_model_is_a_clear_error(multiclass, tmp_path, capsys):
    (tmp_path / "data/models/toy/model.pt").unlink()
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    err = capsys.readouterr().err
    assert "data/models/toy/model.pt: not found" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_render_before_evaluate_is_a_clear_error(multiclass, tmp_path, capsys):
    assert run_stage(render.render, ["toy"]) == 1
    err = capsys.readouterr().err
    assert err == "render toy: error: data/models/toy/release.pt: not found; run the evaluate stage first\n"
    assert not (tmp_path / "metrics/toy/render").exists()


def rewrite_checkpoint(path, change) -> None:
    checkpoint = torch.load(path, weights_only=True)
    torch.save(change(checkpoint), path)


def with_nan(checkpoint):
    checkpoint["state_dict"]["head.weight"][0, 0] = float("nan")
    return checkpoint


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: {**c, "model": {**c["model"], "width": 8}}, r"tensor .* has shape .*, the architecture needs"),
        (lambda c: {**c, "model": {**c["model"], "in_channels": 3}}, r"tensor enc1\.0\.weight has shape"),
        (
            lambda c: {k: v for k, v in c.items() if k != "model"},
            r"expected a mapping of format, model, plan, state_dict \(and evaluation\)",
        ),
        (
            lambda c: torch.zeros(3),
            r"expected a mapping of format, model, plan, state_dict \(and evaluation\); got Tensor",
        ),
        # Refused before the network is built: a width of 20,000 would allocate gigabytes first.
        (lambda c: {**c, "model": {**c["model"], "width": 20000}}, r"model width must be an integer in \[1, 256\]"),
        (lambda c: {**c, "model": {**c["model"], "arch": "resnet"}}, r"unknown architecture 'resnet'"),
        (with_nan, r"tensor head\.weight holds NaN or infinite values"),
        (lambda c: {**c, "state_dict": {}}, r"missing tensors"),
        (lambda c: {**c, "plan": 5}, r"'plan' must be a mapping of dataset, task, classes, colors, scale"),
    ],
    ids=["width", "channels", "no-model-key", "bare-tensor", "huge-width", "arch", "nan", "no-weights", "plan"],
)
def test_a_checkpoint_that_does_not_fit_is_one_line(multiclass, tmp_path, capsys, change, message):
    path = tmp_path / "data/models/toy/model.pt"
    rewrite_checkpoint(path, change)
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate toy: error: data/models/toy/model.pt: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "metrics/toy/eval.json").exists()
    assert not (tmp_path / "data/models/toy/release.pt").exists()


class NotAWeight:  # a pickled instance: what a weights-only load must refuse, never run
    pass


@pytest.mark.parametrize(
    "write",
    [lambda path: path.write_text("not a checkpoint"), lambda path: torch.save({"model": NotAWeight()}, path)],
    ids=["text", "object"],
)
def test_a_file_that_is_no_checkpoint_is_one_line_without_unsafe_advice(multiclass, tmp_path, capsys, write):
    write(tmp_path / "data/models/toy/model.pt")
    assert run_stage(evaluate.evaluate_stage, ["toy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("evaluate toy: error: data/models/toy/model.pt: not a model checkpoint written by train (")
    assert err.count("\n") == 1 and "weights_only" not in err, err


def test_render_refuses_a_release_of_other_weights(binary, tmp_path, capsys):
    """A training after the last evaluate: render would draw the new weights at the old operating point."""
    evaluate.evaluate("eye")
    trained = load_model_file("data/models/eye/model.pt")
    retrained = {
        name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in trained.state_dict.items()
    }
    save_checkpoint("data/models/eye/model.pt", trained.config, retrained, trained.plan.meta)
    assert run_stage(render.render, ["eye"]) == 1
    assert capsys.readouterr().err == (
        "render eye: error: data/models/eye/release.pt: holds other weights than data/models/eye/model.pt; "
        "run the evaluate stage again\n"
    )
    save_release("data/models/eye/release.pt", load_model_file("data/models/eye/model.pt"), Evaluation(0.3))
    assert run_stage(render.render, ["eye"]) == 0  # the same weights again: drawn


def test_a_tampered_prepared_split_is_refused(multiclass, tmp_path, capsys):
    # ids name render's files: one that is a path must never reach it.
    path = tmp_path / "data/prepared/toy/index.json"
    index = path.read_text()
    assert index.count('"test00"') == 1
    path.write_text(index.replace('"test00"', '"../../outside"'))
    assert run_stage(render.render, ["toy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("render toy: error: data/prepared/toy/index.json: ") and "plain name" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "metrics/toy/render").exists()


def test_a_split_without_a_valid_pixel_is_one_line_and_one_such_image_is_scored(tmp_path, monkeypatch, capsys):
    """A training split whose field of view is false everywhere leaves no pixel to choose the threshold on: the
    writer refuses it (and evaluate an index that says so, tests/test_hostile_inputs.py). One such test image
    among others is scored as they are."""
    rng = np.random.default_rng(4)

    def sample(name: str, fov: bool) -> Sample:
        return Sample(
            name,
            rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
            (rng.random((16, 16)) < 0.3).astype(np.uint8),
            np.full((16, 16), fov),
        )

    meta = DatasetMeta("eye", "binary", ["background", "vessel"], [[0, 0, 0], [255, 255, 255]])
    test = [sample("test0", True), sample("test1", False), sample("test2", True)]
    with pytest.raises(PreparedDataError, match="eye/train: no pixel of its 3 images is valid"):
        write_samples(
            tmp_path / "data/prepared/eye",
            meta,
            {"train": [sample(f"train{i}", False) for i in range(3)], "test": test},
        )
    assert not (tmp_path / "data/prepared/eye").exists()
    make_model(tmp_path, "eye", meta, "vgg_unet", stacked(test))
    monkeypatch.chdir(tmp_path)

    write_samples(
        tmp_path / "data/prepared/eye",
        meta,
        {"train": test, "test": [Sample(f"t{s.id}", s.image, s.mask, s.fov) for s in test]},
    )
    assert run_stage(evaluate.evaluate_stage, ["eye"]) == 0, capsys.readouterr().err
    images = json.loads((tmp_path / "metrics/eye/evaluation.json").read_text())["images"]
    assert [image["tp"] + image["fp"] + image["fn"] + image["tn"] for image in images.values()] == [256, 0, 256]


@pytest.mark.parametrize("stage", [evaluate.evaluate_stage, render.render], ids=["evaluate", "render"])
def test_a_model_for_other_input_channels_names_the_split(multiclass, tmp_path, capsys, stage):
    config = {"arch": "simple_unet", "in_channels": 3, "out_channels": multiclass.model_outputs, "width": 4}
    save_checkpoint(tmp_path / "data/models/toy/model.pt", config, build_model(config).state_dict(), multiclass)
    assert run_stage(stage, ["toy"]) == 1
    assert capsys.readouterr().err.endswith(
        "error: data/models/toy/model.pt: the model reads 3-channel images, but data/prepared/toy/test holds "
        "1-channel images; rerun train\n"
    )


def test_a_bug_is_not_dressed_as_a_user_error(multiclass, monkeypatch):
    # Anything but a StageError is a bug: it must keep its traceback rather than become one quiet line.
    def broken(*args, **kwargs):
        raise ValueError("a shape mismatch inside torch")

    monkeypatch.setattr(scoring, "predict_batches", broken)
    with pytest.raises(ValueError, match="a shape mismatch inside torch"):
        run_stage(evaluate.evaluate_stage, ["toy"])
