"""A dataset shaped like DRIVE, added by params alone, as the README's "Add your own dataset" says.

DRIVE (a public set of fundus photographs) ships RGB TIFF images, GIF vessel masks by two annotators (the
second for the test images only), GIF field-of-view masks and an official split by folder, with no
validation images. ``tests/folder_data.py`` writes a small dataset laid out the same way, whose vessels a
tiny network can learn; the tests below check each thing such a dataset needs from the ``folder`` kind (an
empty validation split, reference masks, an epoch that covers the images) and then follow the README's lines
for it through ``dvc repro`` to a minimum test quality and the human baseline beside it.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import train, train_params
from pipeline.datasets import folder
from pipeline.datasets.folder import ImageError, PrepareParams
from pipeline.params import ParamError, parse_section
from pipeline.prepared import DatasetMeta, Split, open_split, save_prepared
from tests.folder_data import encode, write_fundus_folder
from tests.prepare_kind import prepare_kind
from tests.test_own_dataset import paste_recipe, recipe_block, run_command
from tests.tiny_project import TINY_PARAMS, dvc, make_project, stages_run

RETINA = {
    "images": "*/images/{id}_*.tif",
    "masks": "*/1st_manual/{id}_manual1.gif",
    "valid": "*/mask/{id}_*_mask.gif",
    "split": {"method": "ids", "test_ids": ["01", "02", "03"], "val_ids": []},
}


_PREPARED = itertools.count()


def prepared_dir(raw_dir: Path) -> Path:
    """A new directory beside the dataset's (the raw folder's name is the dataset's) to prepare it into."""
    return raw_dir.parent / f"{raw_dir.name}.prepared-{next(_PREPARED)}"


def prepare(raw_dir: Path, directory: Path | None = None, **raw):
    """``(meta, splits in memory, summary)`` of the dataset, prepared by the stage's writer into ``directory``."""
    return prepare_kind(
        folder, raw_dir, parse_section(PrepareParams, raw, "drive.prepare"), directory or prepared_dir(raw_dir)
    )


@pytest.fixture(scope="module")
def fundus(tmp_path_factory) -> Path:
    return write_fundus_folder(
        tmp_path_factory.mktemp("raw") / "drive", size=(24, 22), train=range(21, 27), test=range(1, 4)
    )


# ------------------------------------------------------------------------------------------ empty validation


def test_every_split_method_can_leave_the_validation_split_empty(fundus, tmp_path):
    ids_split = RETINA["split"]
    (fundus / "split.txt").write_text("".join(f"{i} train\n" for i in range(21, 27)) + "01 test\n02 test\n03 test\n")
    for n, split in enumerate(
        (
            ids_split,
            {**ids_split, "val_ids": None},
            {"method": "ratio", "val": 0, "test": 0.3},
            {"method": "file", "file": "split.txt"},
        )
    ):
        _, splits, summary = prepare(fundus, tmp_path / f"drive-{n}", **{**RETINA, "split": split})
        if split["method"] == "ratio":  # each id's split drawn from a hash of the seed and the id: about 30 % test
            assert len(splits["val"]) == 0 and len(splits["test"]) >= 1 and len(splits["train"]) >= 1, split
            assert len(splits["train"]) + len(splits["test"]) == 9, split
        else:
            assert [len(splits[name]) for name in ("train", "val", "test")] == [6, 0, 3], split
        # An empty split has no image, so no size in the index: only its channels are known.
        assert len(splits["val"]) == 0 and splits["val"].images.shape[0] == 0 and splits["val"].images.shape[-1] == 3
        assert splits["train"].fov.shape == (len(splits["train"]), 24, 22)  # validity masks: a fov on every sample
        assert summary["val"]["images"] == 0
        val = open_split(tmp_path / f"drive-{n}", "val")  # the stage wrote it, and it opens
        assert len(val) == 0 and val.ids == [] and list(val) == []

    with pytest.raises(ParamError, match=r"drive\.prepare\.split\.test_ids: must list at least one id when method"):
        prepare(fundus, **{**RETINA, "split": {**ids_split, "test_ids": []}})
    with pytest.raises(ParamError, match=r"drive\.prepare\.split\.test: must be in \(0, 1\), got 0"):
        prepare(fundus, **{**RETINA, "split": {"method": "ratio", "val": 0.2, "test": 0}})
    with pytest.raises(ParamError, match=r"drive\.prepare\.split\.val: must be in \[0, 1\), got -0\.1"):
        prepare(fundus, **{**RETINA, "split": {"method": "ratio", "val": -0.1, "test": 0.2}})


# ------------------------------------------------------------------------------------------ reference masks


def test_reference_masks_are_the_prepared_second_annotator_of_the_test_images(fundus, tmp_path):
    with_reference = {**RETINA, "reference_masks": "test/2nd_manual/{id}_manual2.gif"}
    _, splits, _ = prepare(fundus, tmp_path / "drive", **with_reference)
    test = splits["test"]
    expected = np.stack(
        [
            folder.decode_mask(
                (fundus / f"test/2nd_manual/{i}_manual2.gif").read_bytes(),
                "x",
                parse_section(PrepareParams, with_reference, "k"),
            )[0]
            for i in ("01", "02", "03")
        ]
    )
    assert np.array_equal(test.reference_masks, expected) and test.reference_masks.any()
    assert not np.array_equal(test.reference_masks, test.masks)  # the second annotator, not the first
    assert splits["train"].reference_masks is None  # scored on the test images only, as the human baseline
    written = open_split(tmp_path / "drive", "test")  # read back sample by sample, as the stages read it
    assert written.has_reference and not open_split(tmp_path / "drive", "train").has_reference
    assert all(np.array_equal(sample.reference, expected[k]) for k, sample in enumerate(written))

    # Every test image needs one, and every one an image.
    missing = {**with_reference, "split": {**RETINA["split"], "test_ids": ["01", "02", "21"]}}
    with pytest.raises(
        ImageError,
        match=r"^training/images/21_training\.tif: no file matches drive\.prepare\."
        r"reference_masks 'test/2nd_manual/\{id\}_manual2\.gif' for test id '21'$",
    ):
        prepare(fundus, **missing)
    stray = fundus / "test/2nd_manual/99_manual2.gif"
    stray.write_bytes((fundus / "test/2nd_manual/01_manual2.gif").read_bytes())
    try:
        with pytest.raises(ImageError, match=r"^test/2nd_manual/99_manual2\.gif: no image matches"):
            prepare(fundus, **with_reference)
    finally:
        stray.unlink()
    small = fundus / "test/2nd_manual/02_manual2.gif"
    kept = small.read_bytes()
    small.write_bytes(encode(np.zeros((5, 5), np.uint8), "GIF"))
    try:
        with pytest.raises(
            ImageError,
            match=r"^test/2nd_manual/02_manual2\.gif: 5 x 5 pixels, but its image "
            r"test/images/02_test\.tif has 22 x 24",
        ):
            prepare(fundus, **with_reference)
    finally:
        small.write_bytes(kept)
    with pytest.raises(ParamError, match=r"k\.reference_masks: must hold \{id\} exactly once"):
        parse_section(PrepareParams, {**RETINA, "reference_masks": "test/2nd_manual/x.gif"}, "k")
    multiclass = {
        **with_reference,
        "task": "multiclass",
        "classes": ["background", "artery", "vein"],
        "mask_encoding": "index",
    }
    with pytest.raises(ParamError, match=r"k\.reference_masks: a human baseline is scored for a binary task only"):
        parse_section(PrepareParams, multiclass, "k")


# ------------------------------------------------------------------------------------------ samples per epoch


@pytest.fixture
def patches_dataset(tmp_path, monkeypatch):
    """3 training images of 40 x 48 pixels, the field of view of the last one a 20 x 20 square: the prepared
    training split, the same images prepared without a field of view, and the train section."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    fov = np.ones((3, 40, 48), bool)
    fov[2] = False
    fov[2, 5:25, 10:30] = True
    train_split = Split(
        images=images, masks=(images[..., 0] > 128).astype(np.uint8), ids=np.array(["a", "b", "c"]), fov=fov
    )
    empty = Split(images=images[:0], masks=train_split.masks[:0], ids=np.array([], dtype=str), fov=fov[:0])
    meta = DatasetMeta(name="toy", task="binary", classes=["background", "vessel"], colors=[[0, 0, 0], [255, 0, 0]])
    save_prepared(tmp_path / "data/prepared/toy", meta, {"train": train_split, "val": empty, "test": train_split})
    whole = Split(images=images, masks=train_split.masks, ids=train_split.ids)  # no field of view: whole images
    save_prepared(
        tmp_path / "whole",
        meta,
        {"train": whole, "val": Split(images[:0], whole.masks[:0], whole.ids[:0]), "test": whole},
    )
    section = {
        "arch": "vgg_unet",
        "width": 2,
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.01,
        "loss": "bce_dice",
        "patch_size": 16,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": section}}))
    monkeypatch.chdir(tmp_path)
    return open_split(tmp_path / "data/prepared/toy", "train"), open_split(tmp_path / "whole", "train"), section


def test_an_epoch_of_patches_covers_each_training_image_once_by_default(patches_dataset, capsys):
    split, whole, section = patches_dataset
    done = train.train("toy")
    out = capsys.readouterr().out
    # 40 x 48 pixels in 16 x 16 patches: 8 (7.5) to cover each of two images, 2 for the 20 x 20 field of view
    assert re.search(
        r"3 training images, 18 samples per epoch \(samples_per_epoch null: 16 x 16 patches "
        r"that cover each training image's scored area once\)",
        out,
    ), out
    assert done.startswith("train toy: 1 epochs in ")

    def samples(**changes) -> int:
        return train_params.epoch_samples(
            parse_section(train_params.TrainParams, {**section, **changes}, "toy.train"), split
        )

    assert samples() == 18
    assert samples(samples_per_epoch=1600) == 1600  # given: as it was (STARE)
    assert samples(patch_size=None) == 3  # whole images: one pass, as it was (MNIST)
    assert split.has_fov and not whole.has_fov  # no field of view: the whole image counts
    assert train_params.epoch_samples(parse_section(train_params.TrainParams, section, "toy.train"), whole) == 24


# ------------------------------------------------------------------------------------------ the README's lines


def test_the_readme_lines_for_a_drive_like_dataset_train_to_a_useful_f1(tmp_path):
    repo = tmp_path / "repo"
    env = make_project(repo, tmp_path / "mirror", TINY_PARAMS)
    where = {"/data/DRIVE": str(write_fundus_folder(tmp_path / "DRIVE"))}  # 64 x 60 pixels, 20 + 20 images
    # The README's training but for the network's width and the patches' size, which fit images this small.
    assert paste_recipe(repo, "retina", where, {"width": 4, "patch_size": 32}) == "drive"
    run_command(recipe_block("retina command"), repo, env, where)
    result = dvc("repro", "evaluate@drive", cwd=repo, env=env)
    assert stages_run(result.stdout) == {f"{stage}@drive" for stage in ("download", "prepare", "train", "evaluate")}

    data = json.loads((repo / "metrics/drive/data.json").read_text())
    assert [s["images"] for s in data["splits"]] == [20, 0, 20]  # the official split, no validation images
    # No samples_per_epoch: patches that cover each image's field of view (56 x 56) once, 4 each.
    assert "20 training images, 80 samples per epoch (samples_per_epoch null" in result.stdout
    scores = json.loads((repo / "metrics/drive/eval.json").read_text())
    # Calling every pixel a vessel scores F1 0.28 (0.16 of the test pixels are vessels). Measured: F1 0.905,
    # ROC-AUC 0.998; with one patch per image per epoch, as before the default, F1 0.518, ROC-AUC 0.888.
    assert scores["dice"] > 0.75 and scores["roc_auc"] > 0.95, scores

    # The second annotator scored against the first inside the field of view, as STARE's: recounted here.
    def pixels(name: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(path)) > 0 for path in sorted(Path(where["/data/DRIVE"]).glob(name))])

    first, second, fov = (pixels(f"test/{sub}/*.gif") for sub in ("1st_manual", "2nd_manual", "mask"))
    both = int((first & second & fov).sum())
    recount = 2 * both / (int((first & fov).sum()) + int((second & fov).sum()))
    human = json.loads((repo / "metrics/drive/evaluation.json").read_text())["scores"]["human"]
    assert scores["human_dice"] == human["dice"] == round(recount, 6) and 0.75 < recount < 0.9, (scores, recount)
