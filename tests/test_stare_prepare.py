"""STARE prepare on tiny synthetic archives built like the real ones (gzipped binary PPMs in tars)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import params as params_module
from pipeline.archives import ArchiveError
from pipeline.datasets import stare
from pipeline.params import ParamError
from pipeline.prepared import open_split
from pipeline.stage import StageError
from tests.prepare_kind import prepare_kind
from tests.synthetic import (
    BOTTOM,
    CENTRE,
    IDS,
    RADIUS,
    TOP,
    H,
    W,
    build_raw,
    pnm,
    synthetic_image,
    true_disc,
    vessel_lines,
)


def load_params(tmp_path: Path, **overrides) -> stare.PrepareParams:
    """Parse through params.yaml, as the stage does; tiny images need a narrower blur."""
    section = {"image_size": [H, W], "fov_smoothing": 1.0, **overrides}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"stare": {"prepare": section}}))
    return params_module.load_params("stare", "prepare", stare.PrepareParams, path)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    return build_raw(tmp_path_factory.mktemp("stare") / "raw")


# ------------------------------------------------------------------------------------------ splits


def test_standard_split(raw, tmp_path):
    params = load_params(tmp_path, val_ids=["im0139", "im0082"])
    meta, splits, summary = prepare_kind(stare, raw, params, tmp_path / "prepared")
    assert meta.name == "stare" and meta.task == "binary" and meta.classes == ["background", "vessel"]
    assert splits["test"].ids.tolist() == stare.STANDARD_TEST
    assert splits["val"].ids.tolist() == ["im0082", "im0139"]  # in protocol order, whatever the YAML order
    assert splits["train"].ids.tolist() == [i for i in stare.STANDARD_TRAIN if i not in ("im0082", "im0139")]
    for name, split in splits.items():
        assert split.images.shape == (len(split), H, W, 3) and split.images.dtype == np.uint8
        assert split.masks.dtype == np.uint8 and set(np.unique(split.masks)) == {0, 1}
        assert split.fov.dtype == np.bool_ and split.fov.shape == (len(split), H, W)
        for k, image_id in enumerate(split.ids):
            n = IDS.index(image_id)
            np.testing.assert_array_equal(split.masks[k], vessel_lines(n, extra=False) // 255)  # AH: ground truth
            np.testing.assert_array_equal(split.reference_masks[k], vessel_lines(n, extra=True) // 255)  # VK
        assert summary[name]["images"] == len(split)
    # The contract: the stage wrote every array of every sample, read back one by one as well as stacked.
    saved = open_split(tmp_path / "prepared", "test")
    assert saved.has_fov and saved.has_reference and saved.sizes == [(H, W)] * len(saved)
    for k, sample in enumerate(saved):
        assert sample.id == splits["test"].ids[k]
        np.testing.assert_array_equal(sample.reference, splits["test"].reference_masks[k])
        np.testing.assert_array_equal(sample.fov, splits["test"].fov[k])


def test_the_default_trains_on_all_ten_training_images_and_holds_none_out(raw, tmp_path):
    _, splits, summary = prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")
    assert splits["train"].ids.tolist() == stare.STANDARD_TRAIN
    # An empty split has no image, so no size in the index: only its channels are known.
    val = splits["val"]
    assert len(val) == 0 and val.images.shape[0] == 0 and val.images.shape[-1] == 3 and val.ids.dtype.kind == "U"
    assert summary["val"] == {"images": 0}  # no empty list: `dvc plots show` fails on one (test_pipeline_e2e)
    prepared = open_split(tmp_path / "prepared", "val")
    assert len(prepared) == 0 and prepared.ids == [] and prepared.sizes == [] and list(prepared) == []


def test_annotator_vk_swaps_ground_truth_and_reference(raw, tmp_path):
    _, splits, summary = prepare_kind(stare, raw, load_params(tmp_path, annotator="vk"), tmp_path / "prepared")
    n = IDS.index(splits["test"].ids[0])
    np.testing.assert_array_equal(splits["test"].masks[0], vessel_lines(n, extra=True) // 255)
    np.testing.assert_array_equal(splits["test"].reference_masks[0], vessel_lines(n, extra=False) // 255)
    assert summary["annotator"] == "vk" and summary["reference_annotator"] == "ah"


def test_leave_one_out(raw, tmp_path):
    params = load_params(tmp_path, split="loo:im0240", val_ids=["im0001"])
    _, splits, _ = prepare_kind(stare, raw, params, tmp_path / "prepared")
    assert splits["test"].ids.tolist() == ["im0240"]
    assert splits["val"].ids.tolist() == ["im0001"]
    assert sorted(splits["train"].ids.tolist() + ["im0001", "im0240"]) == sorted(IDS)


def test_summary_counts_vessels_in_fov_and_over_all_pixels(raw, tmp_path):
    _, splits, summary = prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")
    test, numbers = splits["test"], summary["test"]
    vk = test.reference_masks.astype(bool)
    assert numbers["vk"]["vessel_fraction_of_all_pixels"] == pytest.approx(vk.mean())
    assert numbers["vk"]["vessel_fraction_in_fov"] == pytest.approx(vk[test.fov].mean())
    assert numbers["ah"]["vessel_fraction_in_fov"] < numbers["vk"]["vessel_fraction_in_fov"]  # VK has an extra line
    assert numbers["ah"]["fraction_of_vessel_pixels_outside_fov"] == 0  # the vessels lie inside the disc
    assert numbers["fov_fraction"] == pytest.approx(test.fov.mean())
    assert set(summary["fov_fraction_per_image"]) == set(IDS)


# ------------------------------------------------------------------------------------------ field of view


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_fov_follows_the_disc():
    image = synthetic_image(0, vessel_lines(0, extra=True))
    # erosion=1, the default: the threshold crossing lies a pixel out, in the blurred step into the frame.
    fov = stare.field_of_view(image, threshold=45, smoothing=1.0, erosion=1)
    assert iou(fov, true_disc()) > 0.95
    eroded = stare.field_of_view(image, threshold=45, smoothing=1.0, erosion=3)
    assert eroded.sum() < fov.sum() and not (eroded & ~fov).any()


def large_disc(scale: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The synthetic disc ``scale`` times larger: ``(image, disc, distance from centre, angle in degrees)``.

    Large enough that the features below can be far bigger than the circle fit's 3-pixel tolerance.
    """
    y, x = np.mgrid[: H * scale, : W * scale]
    distance = np.hypot(y - CENTRE[0] * scale, x - CENTRE[1] * scale)
    angle = np.degrees(np.arctan2(y - CENTRE[0] * scale, x - CENTRE[1] * scale))
    disc = (distance <= RADIUS * scale) & (y >= TOP * scale) & (y <= BOTTOM * scale)
    image = np.zeros((H * scale, W * scale, 3), dtype=np.uint8)
    image[...] = (14, 25, 14)
    image[disc] = (170, 90, 20)
    return image, disc, distance, angle


def test_fov_restores_a_dark_rim_from_the_circle():
    image, disc, distance, angle = large_disc()
    # A crescent darker than the threshold, 40 degrees of the edge, like im0004's rim near its optic disc.
    dark_rim = disc & (distance > distance[disc].max() - 12) & (np.abs(angle) < 20)
    image[dark_rim] = (30, 30, 20)
    fov = stare.field_of_view(image, threshold=45, smoothing=2.0, erosion=1)
    assert fov[dark_rim].mean() > 0.9
    assert iou(fov, disc) > 0.98


def test_fov_keeps_the_notch():
    image, disc, distance, angle = large_disc()
    # STARE's notch: a tab of retina sticking out of the disc at the upper right.
    notch = (distance > distance[disc].max()) & (distance < distance[disc].max() + 12) & (np.abs(angle + 45) < 5)
    image[notch] = (170, 90, 20)
    fov = stare.field_of_view(image, threshold=45, smoothing=2.0, erosion=1)
    assert fov[notch].mean() > 0.8
    assert iou(fov, disc | notch) > 0.98


def test_fov_of_a_dark_image_is_an_error():
    with pytest.raises(ValueError, match="fov_threshold"):
        stare.field_of_view(np.full((H, W, 3), 10, dtype=np.uint8), threshold=45, smoothing=1.0, erosion=0)


@pytest.mark.parametrize("shape", ["square", "left half"])
def test_fov_of_an_edge_that_is_not_a_circle_is_an_error(shape):
    # Under half of a square's edge lies on any one circle; the left half's edge is a straight line, on
    # which no three points make a circle at all.
    y, x = np.mgrid[:200, :240]
    image = np.zeros((200, 240, 3), dtype=np.uint8)
    image[...] = (14, 25, 14)
    image[((y >= 20) & (y < 180) & (x >= 40) & (x < 200)) if shape == "square" else (x < 120)] = (170, 90, 20)
    with pytest.raises(ValueError, match=r"edge is not a circle \(\d+% of it fits one\); is fov_threshold=45"):
        stare.field_of_view(image, threshold=45, smoothing=2.0, erosion=1)


def test_fov_error_names_the_image(tmp_path):
    dark = gzip.compress(pnm(np.full((H, W, 3), 10, dtype=np.uint8)))
    raw = build_raw(tmp_path / "raw", images={"im0235.ppm.gz": dark})
    with pytest.raises(StageError, match="stare-images.tar:im0235: cannot find the field of view: no pixel brighter"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


# ------------------------------------------------------------------------------------------ bad archives


def test_corrupt_member(tmp_path):
    good = gzip.compress(pnm(synthetic_image(0, vessel_lines(0, False))))
    raw = build_raw(tmp_path / "raw", images={"im0003.ppm.gz": good[: len(good) // 2]})
    with pytest.raises(ArchiveError, match="im0003.ppm.gz"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_image_without_mask(tmp_path):
    raw = build_raw(tmp_path / "raw", vk={"im0005.vk.ppm.gz": None})
    with pytest.raises(ArchiveError, match=r"labels-vk.tar: no mask for image\(s\) \['im0005'\]"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_mask_without_image(tmp_path):
    raw = build_raw(tmp_path / "raw", ah={"im0999.ah.ppm.gz": gzip.compress(pnm(vessel_lines(0, False)))})
    with pytest.raises(ArchiveError, match="im0999"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_non_binary_mask(tmp_path):
    mask = vessel_lines(0, extra=False)
    mask[5, 5] = 128
    raw = build_raw(tmp_path / "raw", ah={"im0044.ah.ppm.gz": gzip.compress(pnm(mask))})
    with pytest.raises(StageError, match=r"im0044.ah.ppm.gz: not a binary mask, values \[0, 128, 255\]"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_wrong_image_size(tmp_path):
    image = np.zeros((H + 1, W, 3), dtype=np.uint8)
    raw = build_raw(tmp_path / "raw", images={"im0077.ppm.gz": gzip.compress(pnm(image))})
    with pytest.raises(StageError, match=f"im0077.ppm.gz: image is {H + 1}x{W} .* expected {H}x{W}"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_truncated_ppm(tmp_path):
    data = pnm(synthetic_image(0, vessel_lines(0, False)))
    raw = build_raw(tmp_path / "raw", images={"im0081.ppm.gz": gzip.compress(data[:-1])})
    with pytest.raises(StageError, match=f"im0081.ppm.gz: {H * W * 3 - 1} bytes of samples"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_mask_must_be_greyscale(tmp_path):
    raw = build_raw(tmp_path / "raw", vk={"im0001.vk.ppm.gz": gzip.compress(pnm(np.zeros((H, W, 3), np.uint8)))})
    with pytest.raises(StageError, match="im0001.vk.ppm.gz: expected a P5 file"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_escaping_member_is_refused(tmp_path):
    raw = build_raw(tmp_path / "raw", images={"../x": b"anything"})
    with pytest.raises(ArchiveError, match=r"refusing member '\.\./x'"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_unexpected_member(tmp_path):
    raw = build_raw(tmp_path / "raw", images={"readme.txt": b"hello"})
    with pytest.raises(ArchiveError, match="unexpected member 'readme.txt'"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


def test_missing_archive(tmp_path):
    raw = build_raw(tmp_path / "raw")
    (raw / "labels-ah.tar").unlink()
    with pytest.raises(StageError, match="labels-ah.tar"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")


# ------------------------------------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"annotator": "xx"}, r"stare.prepare.annotator: must be one of \['ah', 'vk'\]"),
        ({"split": "random"}, "stare.prepare.split: must be 'standard' or 'loo:<image id>'"),
        ({"val_ids": ["im0001", "im0001"]}, "stare.prepare.val_ids: has duplicates"),
        ({"image_size": [40]}, "stare.prepare.image_size: must be"),
        ({"fov_threshold": 300}, "stare.prepare.fov_threshold: must be in"),
        ({"fov_erosion": -1}, "stare.prepare.fov_erosion: must be >= 0"),
        ({"unknown": 1}, "stare.prepare.unknown: unknown parameter"),
    ],
)
def test_bad_params_are_refused_when_parsed(tmp_path, overrides, message):
    with pytest.raises(ParamError, match=message):
        load_params(tmp_path, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"val_ids": ["im0162"]}, r"stare.prepare.val_ids: \['im0162'\] also in the test split"),  # overlap
        ({"split": "loo:im0001", "val_ids": ["im0001"]}, r"val_ids: \['im0001'\] also in the test split"),
        ({"val_ids": ["im9999"]}, r"stare.prepare.val_ids: unknown image id\(s\) \['im9999'\]"),
        ({"split": "loo:im9999"}, "stare.prepare.split: unknown image id 'im9999'"),
        ({"val_ids": stare.STANDARD_TRAIN}, "stare.prepare.val_ids: leaves no image to train on"),
    ],
)
def test_bad_split_is_refused(raw, tmp_path, overrides, message):
    with pytest.raises(ParamError, match=message):
        prepare_kind(stare, raw, load_params(tmp_path, **overrides), tmp_path / "prepared")


def test_standard_split_needs_its_images(tmp_path):
    raw = build_raw(
        tmp_path / "raw", images={"im0324.ppm.gz": None}, ah={"im0324.ah.ppm.gz": None}, vk={"im0324.vk.ppm.gz": None}
    )
    with pytest.raises(ParamError, match=r"standard split needs \['im0324'\]"):
        prepare_kind(stare, raw, load_params(tmp_path), tmp_path / "prepared")
