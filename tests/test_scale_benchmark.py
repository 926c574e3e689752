"""``python -m benchmarks.scale`` end to end, on a dozen tiny images: every stage runs for real (manifest, DVC's
download, prepare, train, evaluate and render, predict, push, the appended images' re-run and push) and the table
reports each of them, the ceiling, the loader probe and the append's figures. The figures themselves are not
judged here: at this size they measure start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import scale

REPO = Path(__file__).resolve().parents[1]


def test_splits_are_cityscapes_and_appending_changes_no_earlier_image():
    first = scale.assign_splits(0, scale.FULL_IMAGES, seed=0)
    assert [list(first.values()).count(s) for s in ("train", "val", "test")] == [2975, 500, 500]
    added = scale.assign_splits(scale.FULL_IMAGES, 30, seed=0)
    assert not set(first) & set(added) and sorted(added.values()).count("train") == 22
    assert scale.assign_splits(0, scale.FULL_IMAGES, seed=0) == first  # seeded
    assert scale.split_counts(12) == {"train": 8, "val": 2, "test": 2}


def test_samples_are_seeded_index_masks_with_a_few_ignored_pixels():
    image, mask = scale.make_sample(0, 7, 64, 128)
    again, _ = scale.make_sample(0, 7, 64, 128)
    assert image.shape == (64, 128, 3) and mask.shape == (64, 128) and (image == again).all()
    values = set(mask.ravel().tolist())
    assert scale.IGNORE in values and values - {scale.IGNORE} <= set(range(19))
    assert 0 < (mask == scale.IGNORE).sum() < mask.size / 50


def test_the_disk_plan_takes_what_fits(tmp_path):
    png = 2.3e6
    plan = scale.plan_disk(tmp_path, tmp_path / "remote", 12, scale.APPEND_SHARE, png, 1024, 2048, None)
    assert plan.images == 12 and plan.append == 1
    huge = scale.plan_disk(tmp_path, tmp_path / "remote", 10**9, scale.APPEND_SHARE, png, 1024, 2048, None)
    assert 0 < huge.images < 10**9 and huge.need <= huge.free < huge.need_asked[0]
    assert "asked for would need" in "\n".join(huge.lines())


@pytest.mark.timeout(600)
def test_a_small_run_reports_every_stage_and_the_append(tmp_path):
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scale",
            "--images",
            "12",
            "--size",
            "128x64",
            "--samples",
            "32",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("segpipe scale benchmark:") :]
    for step in (
        "manifest",
        "download@city",
        "ceiling: Pillow",
        "prepare@city",
        "prepare / ceiling",
        "train@city",
        "  loader (",
        "model (vgg_unet",
        "evaluate@city",
        "render@city",
        "predict",
        "dvc push (everything)",
        "dvc repro, +1 images",
        "  prepare@city",
        "dvc push (appended)",
        "+1 images: added to the cache",
        "+1 images: pushed",
    ):
        assert step in table, f"no row {step!r} in\n{table}"
    assert "FAILED" not in table and "not run" not in table
    assert "CPU: " in result.stdout and "avx2" in result.stdout

    figures = json.loads(out.read_text())
    assert figures["images"] == 12 and figures["splits"] == {"train": 8, "val": 2, "test": 2}
    for what in ("cache", "remote"):
        append = figures[f"append_{what}"]
        assert 0 < append["added_bytes"] < append["total_bytes"] and 0 < append["share"] < 1
    assert figures["probe"]["loader"]["patches_per_s"] > 0 and figures["probe"]["model"]["steps_per_s"] > 0
    assert figures["runs"]["prepare"]["stages"]["prepare"]["peak"] > 0
    assert not (tmp_path / "work/project").exists()  # removed without --keep
