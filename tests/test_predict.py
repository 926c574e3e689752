"""predict on generated images of every format and size, tiled and whole, against the model run directly and
against evaluate's own predictions, from the model file alone (no params.yaml); and its errors, one line each,
the other images still written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from pipeline import evaluate, predict, segment
from pipeline.checkpoint import Evaluation, load_checkpoint, load_model_file, save_checkpoint, save_release
from pipeline.confusion import ConfusionMatrix
from pipeline.images import read_image, resize
from pipeline.inference import Predictor, logits_to_labels, predict_batches, tile_spans, tiled_logits
from pipeline.models import build_model
from pipeline.prepared import DatasetMeta, Sample, write_samples
from pipeline.runtime import setup
from pipeline.tasks import TASKS
from pipeline.viz import BACKGROUND_DIM, overlay, to_rgb

BINARY = DatasetMeta("eye", "binary", ["background", "vessel"], [[0, 0, 0], [250, 20, 30]])
HALF = DatasetMeta(BINARY.name, BINARY.task, BINARY.classes, BINARY.colors, scale=0.5)  # prepared at half size
MULTICLASS = DatasetMeta(
    "toy", "multiclass", ["background", "a", "b", "c"], [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
)
THRESHOLD = 0.4  # not evaluate's default, so that a test sees whether the release's is used


@pytest.fixture(autouse=True)
def repeatable_setup(monkeypatch, tmp_path):
    # runtime.setup runs once per process in real use; torch refuses to set the inter-op thread count again
    # after parallel work, which these tests do between runs in one process.
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    monkeypatch.chdir(tmp_path)


def make_model(meta: DatasetMeta, arch: str, channels: int, seed: int = 0) -> None:
    """An untrained checkpoint at data/models/<name>/model.pt, with a head loud enough to predict every class.

    Freshly initialised, the networks give nearly the same logits everywhere (a spread of 0.01 for the VGG
    U-Net at width 4): the head is rescaled to a spread of 2 per output and centred on the median logit.
    """
    torch.manual_seed(seed)
    config = {"arch": arch, "in_channels": channels, "out_channels": meta.model_outputs, "width": 4}
    model = build_model(config).eval()
    calibration = np.random.default_rng(seed).integers(0, 256, (4, 32, 32, channels), dtype=np.uint8)

    def logits_per_output() -> torch.Tensor:
        ((_, logits),) = predict_batches(model, calibration, 4, "cpu")
        return logits.transpose(0, 1).flatten(1)

    with torch.no_grad():
        gain = 2 / logits_per_output().std(dim=1)
        model.head.weight *= gain[:, None, None, None]
        model.head.bias *= gain
        model.head.bias -= logits_per_output().median(dim=1).values
    save_checkpoint(Path("data/models") / meta.name / "model.pt", config, model.state_dict(), meta)


def write_params(**sections) -> None:
    Path("params.yaml").write_text(yaml.safe_dump(sections))


def release(meta: DatasetMeta, threshold: float = 0.5, tta: str = "none", batch_size: int = 256) -> Path:
    """data/models/<name>/release.pt as evaluate writes it: train's model file with an operating point."""
    path = Path("data/models") / meta.name / "release.pt"
    trained = load_model_file(Path("data/models") / meta.name / "model.pt")
    save_release(path, trained, Evaluation(threshold, tta, batch_size, {"dice": 0.5}))
    return path


def loaded(meta: DatasetMeta) -> torch.nn.Module:
    model, _ = load_checkpoint(Path("data/models") / meta.name / "model.pt", setup(0))
    return model


def direct(model: torch.nn.Module, pixels: np.ndarray, threshold: float = THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities or softmax) of one image, the model run directly through pipeline.inference."""
    ((_, logits),) = predict_batches(model, pixels[None].copy(), 1, "cpu")  # a copy: PIL's arrays are read-only
    probabilities = torch.sigmoid(logits[0, 0]) if logits.shape[1] == 1 else torch.softmax(logits[0], dim=0)
    return logits_to_labels(logits, threshold)[0].numpy(), probabilities.numpy()


def read_png(path: Path) -> Image.Image:
    picture = Image.open(path)
    picture.load()
    return picture


def quantized(probabilities: np.ndarray) -> np.ndarray:
    return np.rint(probabilities.astype(np.float64) * 65535).astype(np.uint16)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ generated images


def write_inputs(directory: Path) -> dict[str, Path]:
    """One image per format, each of its own size; none but the PNG a multiple of 16, two not of 4."""
    rng = np.random.default_rng(3)
    directory.mkdir()
    rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    files = {
        "png": directory / "photo.png",
        "jpeg": directory / "snap.JPG",
        "tiff": directory / "scan.tif",
        "gif": directory / "anim.gif",
        "png16": directory / "deep.png",
    }
    Image.fromarray(rgb(32, 48)).save(files["png"])
    Image.fromarray(rgb(37, 50)).save(files["jpeg"], format="JPEG", quality=80)
    tifffile.imwrite(files["tiff"], rng.integers(0, 65536, (29, 44, 3), dtype=np.uint16))
    Image.fromarray(rgb(24, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(files["gif"])
    Image.fromarray(rng.integers(0, 65536, (20, 36), dtype=np.uint16)).save(files["png16"])
    (directory / "notes.txt").write_text("not an image: skipped in a directory")
    return files


@pytest.mark.parametrize("meta, arch, channels", [(BINARY, "vgg_unet", 3), (MULTICLASS, "simple_unet", 1)])
def test_every_format_and_size_matches_the_model_run_directly(meta, arch, channels, tmp_path, capsys):
    make_model(meta, arch, channels)
    release(meta, threshold=THRESHOLD, batch_size=4)
    files = write_inputs(tmp_path / "in")
    assert not Path("params.yaml").exists()  # predict reads the model file alone

    assert predict.main([meta.name, "in", "--out", "out", "--overlay-format", "png"]) == 0
    out = capsys.readouterr()
    assert re.fullmatch(
        rf"predict {meta.name}: 5 images in [\d.]+ s \([\d.]+ images/s, [\d.]+ Mpixel/s\) -> out\n", out.out
    )
    assert out.err == ""  # no bar when stderr is not a terminal

    model = loaded(meta)
    for path in files.values():
        pixels = read_image(path.read_bytes(), str(path), channels)
        labels, probabilities = direct(model, pixels)
        mask = read_png(tmp_path / "out" / f"{path.stem}.png")
        assert mask.mode == "P" and mask.size == (pixels.shape[1], pixels.shape[0])
        np.testing.assert_array_equal(np.asarray(mask), labels, err_msg=path.name)
        assert mask.getpalette()[: 3 * meta.num_classes] == [v for color in meta.colors for v in color]
        picture = np.asarray(read_png(tmp_path / "out" / f"{path.stem}_overlay.png"))
        np.testing.assert_array_equal(picture, overlay(to_rgb(pixels), labels, meta.colors, 0.5))
        prob = tmp_path / "out" / f"{path.stem}_prob.png"
        if meta.task == "binary":
            assert read_png(prob).mode == "I;16"
            np.testing.assert_array_equal(np.asarray(read_png(prob)), quantized(probabilities))
        else:
            assert not prob.exists()
    assert len(np.unique(np.asarray(read_png(tmp_path / "out/photo.png")))) > 1  # the check has teeth
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        name for path in files.values() for name in TASKS[meta.task].output_names(path.stem, "png")
    )


def test_threshold_and_batch_size_from_the_command_line(tmp_path, capsys):
    make_model(BINARY, "vgg_unet", 3)
    release(BINARY, threshold=THRESHOLD)
    pixels = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("x.png")
    assert predict.main(["eye", "x.png", "--out", "out", "--threshold", "0.7", "--batch-size", "1"]) == 0
    labels, _ = direct(loaded(BINARY), pixels, threshold=0.7)
    np.testing.assert_array_equal(np.asarray(read_png(tmp_path / "out/x.png")), labels)
    assert (tmp_path / "out/x_overlay.jpg").exists()


def test_a_folder_datasets_scale_resizes_before_the_model_and_back_after(tmp_path):
    """The plan's scale, which prepare recorded in meta.json (a folder dataset's prepare.scale)."""
    make_model(HALF, "vgg_unet", 3)
    release(HALF, threshold=THRESHOLD)
    pixels = np.random.default_rng(6).integers(0, 256, (61, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("x.png")
    assert predict.main(["eye", "x.png", "--out", "out"]) == 0
    mask = np.asarray(read_png(tmp_path / "out/x.png"))
    assert mask.shape == (61, 70)
    labels, _ = direct(loaded(BINARY), resize(pixels, 0.5, nearest=False))  # 30 x 35, as prepare would make it
    assert labels.shape == (30, 35)
    # Nearest neighbour back to the input's size: output pixel (y, x) is the label at its centre's position.
    rows, cols = (np.arange(61) + 0.5) * 30 / 61, (np.arange(70) + 0.5) * 35 / 70
    np.testing.assert_array_equal(mask, labels[rows.astype(int)][:, cols.astype(int)])

    assert predict.main(["eye", "x.png", "--out", "unscaled", "--scale", "1"]) == 0
    np.testing.assert_array_equal(np.asarray(read_png(tmp_path / "unscaled/x.png")), direct(loaded(BINARY), pixels)[0])


# ------------------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("length", [1, 15, 96, 97, 150, 250, 333])
def test_tiles_cover_the_side_once_each_kept_pixel_deep_inside(length):
    tile, overlap, multiple = 96, 32, 4
    spans = tile_spans(length, tile, overlap, multiple)
    assert spans[0].keep_start == 0 and spans[-1].keep_end == length
    for span, following in zip(spans, spans[1:]):
        assert span.keep_end == following.keep_start  # the kept parts tile the side exactly
    for span in spans:
        assert span.start % multiple == 0 and span.end - span.start <= tile and span.keep_start < span.keep_end
        assert span.start == 0 or span.keep_start - span.start >= overlap
        assert span.end == length or span.end - span.keep_end >= overlap


def receptive_radius(model: torch.nn.Module, channels: int, size: int = 160) -> int:
    """How far from a pixel the input still moves its output: the extent of the gradient, over a few inputs."""
    radius = 0
    for seed in range(3):
        x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        model(x)[0, :, size // 2, size // 2].sum().backward()
        ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy())
        radius = max(radius, np.abs(ys - size // 2).max(), np.abs(xs - size // 2).max())
    return int(radius)


def test_tiles_with_an_overlap_beyond_the_receptive_field_give_the_whole_image_result(tmp_path):
    make_model(MULTICLASS, "simple_unet", 1)
    release(MULTICLASS, batch_size=1)
    model = loaded(MULTICLASS)
    radius = receptive_radius(model, 1)
    # SimpleUNet width 4: 26 pixels by this measure, 28 by its layers (5 convolutions at full resolution,
    # 4 at half, 2 at a quarter, pooling and bilinear upsampling between). 32 covers both.
    assert radius <= 28
    overlap, tile = 32, 96
    pixels = np.random.default_rng(7).integers(0, 256, (150, 131, 1), dtype=np.uint8)  # 3 x 3 tiles, ragged ends
    Image.fromarray(pixels[..., 0]).save("big.png")

    assert (
        predict.main(
            ["toy", "big.png", "--out", "tiled", "--max-side", "64", "--tile", str(tile), "--overlap", str(overlap)]
        )
        == 0
    )
    assert predict.main(["toy", "big.png", "--out", "whole"]) == 0
    whole = np.asarray(read_png(tmp_path / "whole/big.png"))
    np.testing.assert_array_equal(whole, direct(model, pixels)[0])
    # Every kept pixel's receptive field lies inside its tile, on the whole image's pooling grid: each tile
    # computes the same sums as the whole image does. Only the order of a convolution's additions, which
    # oneDNN may choose by input size, could differ, by an ulp or so. Labels are required to be identical: a
    # decision that an ulp flips needs two logits tied to 1e-7, vanishingly unlikely over 19,650 pixels (the
    # binary test below bounds the probabilities themselves).
    np.testing.assert_array_equal(np.asarray(read_png(tmp_path / "tiled/big.png")), whole)

    predictor = Predictor(model, False, torch.device("cpu"), threshold=0.5, tta="none", tile=tile, overlap=overlap)
    captured = []
    original = predictor.batch
    predictor.batch = lambda images: captured.append(images.shape[1:3]) or original(images)
    predictor.tiled(pixels)
    # Rows from 0, 32 and 56 (the last one ending at 150), columns from 0, 32 and 36: one tile per forward pass.
    assert captured == [(h, w) for h in (96, 96, 94) for w in (96, 96, 95)]

    # Too little context at the tile's edges: the result is no longer the whole image's.
    assert (
        predict.main(["toy", "big.png", "--out", "narrow", "--max-side", "64", "--tile", "40", "--overlap", "4"]) == 0
    )
    assert (np.asarray(read_png(tmp_path / "narrow/big.png")) != whole).any()


def test_tiled_binary_probabilities_match_the_whole_image(tmp_path):
    make_model(BINARY, "simple_unet", 3, seed=1)
    release(BINARY, threshold=THRESHOLD)
    pixels = np.random.default_rng(8).integers(0, 256, (101, 90, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("big.png")
    assert (
        predict.main(["eye", "big.png", "--out", "tiled", "--max-side", "50", "--tile", "80", "--overlap", "32"]) == 0
    )
    labels, probabilities = direct(loaded(BINARY), pixels)
    np.testing.assert_array_equal(np.asarray(read_png(tmp_path / "tiled/big.png")), labels)
    # Within one of the 65,536 levels: an ulp's difference before quantizing can round to the next level.
    tiled = np.asarray(read_png(tmp_path / "tiled/big_prob.png")).astype(np.int64)
    assert np.abs(tiled - quantized(probabilities)).max() <= 1


# ------------------------------------------------------------------------------------------ evaluate's predictions


def evaluated_test_split(ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """STARE-like test images (uint8 RGB, an elliptic field of view) prepared, scored by evaluate at batch size 2
    and THRESHOLD, and saved as ``test/<id>.png`` with ``fov/<id>_fov.png``; then params.yaml removed, so that
    predict has the release alone. ``(images, masks, fov, evaluate's per-image records)``."""
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (len(ids), 40, 48, 3), dtype=np.uint8)
    masks = (rng.random((len(ids), 40, 48)) < 0.3).astype(np.uint8)
    yy, xx = np.mgrid[:40, :48]
    fov = ((yy - 20) / 19) ** 2 + ((xx - 24) / 23) ** 2 <= 1
    make_model(BINARY, "vgg_unet", 3)
    train = [Sample(f"tr{i}", images[i], masks[i], fov) for i in range(2)]
    test = [Sample(name, image, mask, fov) for name, image, mask in zip(ids, images, masks)]
    write_samples("data/prepared/eye", BINARY, {"train": train, "test": test})
    write_params(eye={"evaluate": {"batch_size": 2, "threshold": THRESHOLD}})
    evaluate.evaluate("eye")
    scored = json.loads(Path("metrics/eye/evaluation.json").read_text())["images"]
    Path("params.yaml").unlink()
    Path("test").mkdir()
    Path("fov").mkdir()
    for name, image in zip(ids, images):
        Image.fromarray(image).save(f"test/{name}.png")
        Image.fromarray(fov.astype(np.uint8) * 255).save(f"fov/{name}_fov.png")
    return images, masks, fov, scored


def test_a_prepared_test_split_saved_as_png_is_predicted_as_evaluate_scores_it(tmp_path, monkeypatch):
    """Five STARE-like test images (uint8 RGB, a field of view), batch size 2 as stare's evaluate: predict on
    their PNGs, with the release evaluate wrote and nothing else, gives evaluate's labels and probabilities bit
    for bit, the last batch a single image as there."""
    ids = [f"im{i:04d}" for i in (162, 163, 235, 236, 239)]
    images, masks, fov, scored = evaluated_test_split(ids)

    # What evaluate computes: predict_batches over the split with its batch size, its threshold rule.
    model = loaded(BINARY)
    logits = torch.cat([logits for _, logits in predict_batches(model, images, 2, "cpu")])
    expected_labels = logits_to_labels(logits, THRESHOLD).numpy()
    expected_probabilities = torch.sigmoid(logits[:, 0]).numpy()

    written = {}
    write_outputs = segment.write_outputs
    monkeypatch.setattr(
        segment,
        "write_outputs",
        lambda job, prediction, *rest: (
            written.__setitem__(job.path.stem, prediction),
            write_outputs(job, prediction, *rest),
        ),
    )
    assert predict.main(["eye", "test", "--out", "out"]) == 0
    assert list(written) == ids
    for i, name in enumerate(ids):
        assert np.array_equal(written[name].labels, expected_labels[i])
        assert np.array_equal(written[name].probabilities, expected_probabilities[i])  # float32, every bit
        np.testing.assert_array_equal(np.asarray(read_png(tmp_path / f"out/{name}.png")), expected_labels[i])
        np.testing.assert_array_equal(
            np.asarray(read_png(tmp_path / f"out/{name}_prob.png")), quantized(expected_probabilities[i])
        )
        predicted, target = written[name].labels[fov] == 1, masks[i][fov] == 1
        assert (list(scored)[i], scored[name]["tp"], scored[name]["fp"]) == (
            name,
            int((predicted & target).sum()),
            int((predicted & ~target).sum()),
        )  # the very pixels evaluate counted

    # With the field of view as validity mask: the same inside, background outside, the overlay dimmed there.
    assert (
        predict.main(["eye", "test", "--out", "masked", "--valid", "fov/{stem}_fov.png", "--overlay-format", "png"])
        == 0
    )
    for i, name in enumerate(ids):
        np.testing.assert_array_equal(
            np.asarray(read_png(tmp_path / f"masked/{name}.png")), np.where(fov, expected_labels[i], 0)
        )
        np.testing.assert_array_equal(
            np.asarray(read_png(tmp_path / f"masked/{name}_prob.png")),
            np.where(fov, quantized(expected_probabilities[i]), 0),
        )
        dimmed = images[i].astype(np.float32)
        dimmed[~fov] *= BACKGROUND_DIM
        np.testing.assert_array_equal(
            np.asarray(read_png(tmp_path / f"masked/{name}_overlay.png")),
            overlay(dimmed, np.where(fov, expected_labels[i], 0), BINARY.colors, 0.5),
        )


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture
def toy(tmp_path):
    make_model(MULTICLASS, "simple_unet", 1)
    rng = np.random.default_rng(11)
    Path("in").mkdir()
    for name in ("a", "c"):
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(f"in/{name}.png")
    return tmp_path


def outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_a_corrupt_file_is_one_line_and_the_others_are_written(toy, capsys):
    Path("in/b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    Path("in/.hidden.png").write_bytes(b"junk a file manager left: skipped")
    assert predict.main(["toy", "in", "--out", "out"]) == 1
    out = capsys.readouterr()
    (line,) = error_lines(out.err)
    assert line.startswith("predict toy: error: in/b.png: not a readable image (")
    assert re.fullmatch(r"predict toy: 2 images in .* -> out, 1 failed\n", out.out)
    assert outputs(toy / "out") == ["a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg"]


def test_missing_inputs_and_duplicate_stems_fail_alone(toy, capsys):
    Path("more").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save("more/a.jpg")  # a second "a": would overwrite in/a's outputs
    Path("empty").mkdir()
    assert predict.main(["toy", "in", "missing.png", "more", "empty", "--out", "out"]) == 1
    out = capsys.readouterr()
    assert error_lines(out.err) == [
        "predict toy: error: missing.png: no such file or directory",
        "predict toy: error: more/a.jpg: its output a.png would overwrite that of in/a.png; rename one of them",
        "predict toy: error: empty: no image files in it (.png .jpg .jpeg .tif .tiff .gif .bmp .ppm .pgm .pnm)",
    ]
    assert out.out.endswith(" -> out, 3 failed\n") and out.out.startswith("predict toy: 2 images in ")
    assert outputs(toy / "out") == ["a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg"]


def test_a_missing_validity_mask_fails_that_image_only(toy, capsys):
    Path("masks").mkdir()
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save("masks/a.png")
    assert predict.main(["toy", "in", "--out", "out", "--valid", "masks/{stem}.png"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (
        "predict toy: error: in/c.png: its validity mask masks/c.png cannot be read (No such file or directory)"
    )
    assert outputs(toy / "out") == ["a.png", "a_overlay.jpg"]

    Image.fromarray(np.full((20, 24), 255, np.uint8)).save("masks/c.png")
    assert predict.main(["toy", "in/c.png", "--out", "out", "--valid", "masks/{stem}.png"]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "predict toy: error: in/c.png: validity mask masks/c.png has 24 x 20 pixels, the image 24 x 24"


def tampered_release(change) -> None:
    """The toy model's release.pt, with a part of what it holds changed by ``change``."""
    saved = torch.load("data/models/toy/model.pt", weights_only=True)
    saved["evaluation"] = Evaluation(0.5, "none", 8, {}).to_dict()
    change(saved)
    torch.save(saved, "data/models/toy/release.pt")


@pytest.mark.parametrize(
    "problem, args, message",
    [
        ("no model", [], "predict toy: error: data/models/toy/model.pt: not found; run the train stage first"),
        (
            "bad threshold",
            [],
            "predict toy: error: data/models/toy/release.pt: evaluation threshold must be a number in (0, 1), got 1.5",
        ),
        (
            "bad plan",
            [],
            "predict toy: error: data/models/toy/release.pt: plan: scale must be a number in (0, 16], got 0",
        ),
        (
            "no centre",
            ["--tile", "64", "--overlap", "30"],
            "predict toy: error: --tile 64 leaves no centre inside --overlap 30 on both sides (rounded to the model's "
            "multiple 4: tile 64, overlap 32); the tile must be at least 2 x overlap + 4",
        ),
    ],
)
def test_a_run_that_cannot_start_is_one_line_and_status_1(toy, capsys, problem, args, message):
    if problem == "no model":
        Path("data/models/toy/model.pt").unlink()
    elif problem == "bad threshold":
        tampered_release(lambda saved: saved["evaluation"].update(threshold=1.5))
    elif problem == "bad plan":
        tampered_release(lambda saved: saved["plan"].update(scale=0))
    assert predict.main(["toy", "in", "--out", "out", *args]) == 1
    out = capsys.readouterr()
    assert error_lines(out.err) == [message] and out.out == ""
    assert not Path("out").exists()


def test_a_rerun_into_an_input_directory_does_not_read_its_own_outputs(toy, capsys):
    for _ in range(2):
        assert predict.main(["toy", "in", "--out", "in/predicted"]) == 0
        assert capsys.readouterr().out.startswith("predict toy: 2 images in ")
    assert outputs(toy / "in/predicted") == ["a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg"]


def test_evaluate_and_render_predict_an_image_larger_than_a_tile_in_tiles():
    """predict_batches (evaluate's, render's) tiles an image larger than a tile: the same logits as one forward
    pass wherever a tile's kept centre sees all the context the network uses."""
    torch.manual_seed(0)
    model = build_model({"arch": "simple_unet", "in_channels": 3, "out_channels": 2, "width": 4}).eval()
    image = np.random.default_rng(0).integers(0, 256, (150, 260, 3), dtype=np.uint8)
    ((_, whole),) = predict_batches(model, image[None], 1, "cpu")
    with torch.inference_mode():
        tiled = tiled_logits(model, image, "cpu", tile=96, overlap=16)
    assert len(tile_spans(150, 96, 16, 4)) * len(tile_spans(260, 96, 16, 4)) == 2 * 4
    assert tiled.shape == whole.shape == (1, 2, 150, 260)
    close = torch.isclose(tiled, whole, atol=1e-4).float().mean().item()
    assert close > 0.9, close  # only pixels near a cut between tiles may lack some of their context
    ((_, through_batches),) = predict_batches(model, image[None], 1, "cpu", tile=96)
    with torch.inference_mode():
        assert torch.equal(through_batches, tiled_logits(model, image, "cpu", tile=96))


@pytest.mark.parametrize("meta, loss", [(MULTICLASS, "cross_entropy"), (BINARY, "bce_dice")])
def test_validation_scores_a_large_image_tile_by_tile_as_the_assembled_image(tmp_path, monkeypatch, meta, loss):
    """train's validation pass scores an image larger than a tile one tile at a time (memory holds a tile's
    logits, never the image's): the loss and Dice of the image assembled from the same tiles."""
    from pipeline import validation
    from pipeline.loader import training_target
    from pipeline.losses import build_loss
    from pipeline.prepared import open_split

    rng = np.random.default_rng(1)
    samples = [
        Sample(
            f"s{i}",
            rng.integers(0, 256, (150, 260, 3), dtype=np.uint8),
            rng.integers(0, meta.num_classes, (150, 260), dtype=np.uint8),
            rng.random((150, 260)) > 0.2,
        )
        for i in range(3)
    ]
    write_samples(tmp_path / "p", meta, {"train": samples, "val": samples, "test": samples})
    split = open_split(tmp_path / "p", "val")
    torch.manual_seed(0)
    model = build_model(
        {"arch": "simple_unet", "in_channels": 3, "out_channels": meta.model_outputs, "width": 4}
    ).eval()
    monkeypatch.setattr(validation, "TILE", 96)
    monkeypatch.setattr(validation, "OVERLAP", 16)
    loss = build_loss(loss, meta.task, "toy.train.loss")
    tiled_loss, tiled_dice = validation.validate(model, split, meta, loss, 2, torch.device("cpu"))
    confusion, total = torch.zeros(meta.num_classes**2, dtype=torch.int64), 0.0
    with torch.inference_mode():
        for indices in split.runs(2):
            batch = split.read_many(indices)
            logits = torch.cat([tiled_logits(model, s.image, "cpu", tile=96, overlap=16) for s in batch])
            target = torch.from_numpy(np.stack([training_target(s) for s in batch]))
            total += loss(logits, target).item() * len(batch)
            confusion += validation.confusion_counts(logits, target, meta.num_classes)
    matrix = ConfusionMatrix(meta.num_classes)
    matrix.matrix += confusion.reshape(meta.num_classes, meta.num_classes)
    assert tiled_loss == pytest.approx(total / 3, rel=1e-5)
    assert tiled_dice == matrix.summary(meta.classes)["dice"]
    assert 0 < tiled_dice < 1
