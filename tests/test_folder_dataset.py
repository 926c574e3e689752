"""The ``folder`` kind: datasets described in params.yaml alone, prepared from files the test writes.

Every image format and bit depth the kind promises, the three mask encodings, validity masks, images of
mixed sizes (each kept at its own), the three ways to split, and each mistake a user can make, reported with
the file it concerns. Each dataset is prepared by the prepare stage's own writer (tests/prepare_kind.py).
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from pipeline import images
from pipeline import prepare as prepare_stage
from pipeline.datasets import folder
from pipeline.datasets.folder import PrepareParams
from pipeline.images import ImageError
from pipeline.params import ParamError, parse_section
from pipeline.plans import write_plan
from pipeline.prepared import PreparedDataError, load_meta, load_split, open_splits
from tests.folder_data import RGB_CLASSES, encode, png, write_binary_folder, write_rgb_zip
from tests.prepare_kind import prepare_kind


def params(**raw) -> PrepareParams:
    return parse_section(PrepareParams, raw, "toy.prepare")


_PREPARED = itertools.count()


def prepared_dir(raw_dir: Path) -> Path:
    """A new directory beside the dataset's (the raw folder's name is the dataset's) to prepare it into."""
    return raw_dir.parent / f"{raw_dir.name}.prepared-{next(_PREPARED)}"


def prepare(raw_dir: Path, **raw):
    """``(meta, splits stacked in memory, summary)``: for datasets whose splits each hold one image size."""
    return prepare_kind(folder, raw_dir, params(**raw), prepared_dir(raw_dir))


def prepare_splits(raw_dir: Path, **raw):
    """``(meta, splits read sample by sample, summary)``: for images of different sizes."""
    plan = folder.plan(raw_dir, params(**raw))
    directory = prepared_dir(raw_dir)
    _, tallies = write_plan(plan, directory, recipe_digest="test")
    splits = open_splits(directory)
    return plan.meta, splits, plan.summarize(tallies, splits)


BINARY = {
    "images": "images/{id}.jpg",
    "masks": "masks/{id}_mask.png",
    "valid": "valid/{id}.gif",
    "split": {"method": "ratio", "val": 0.2, "test": 0.2, "seed": 0},
}


# ------------------------------------------------------------------------------------------ decoding


def tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "PPM", "TIFF", "GIF"])
def test_every_format_reads_the_same_rgb_pixels(fmt):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    if fmt == "GIF":  # 256 colours at most: a palette image, looked up
        image = Image.fromarray(rgb).quantize(8)
        rgb = np.asarray(image.convert("RGB"))
        data = io.BytesIO()
        image.save(data, format="GIF")
        data = data.getvalue()
    else:
        data = tiff(rgb) if fmt == "TIFF" else encode(rgb, fmt)
    assert np.array_equal(images.read_image(data, f"x.{fmt.lower()}"), rgb)


def test_bit_depths_and_channels():
    gray16 = np.array([[0, 257, 65535, 1000]], np.uint16)
    expected = np.array([[0, 1, 255, 4]], np.uint8)  # round(v / 257)
    for data, name in ((png(gray16), "a.png"), (tiff(gray16), "a.tif")):
        assert np.array_equal(images.read_image(data, name, channels=1)[..., 0], expected)
        assert np.array_equal(images.read_image(data, name, channels=3), np.repeat(expected[..., None], 3, 2))
    rgb16 = np.full((2, 3, 3), 65535, np.uint16)
    assert (images.read_image(tiff(rgb16), "b.tiff") == 255).all()
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    assert np.array_equal(images.read_image(png(rgba), "c.png"), np.tile([255, 0, 0], (2, 2, 1)))
    # RGB to gray: ITU-R 601 luma, as Pillow's convert("L")
    rgb = np.random.default_rng(1).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    assert (
        np.abs(
            images.read_image(png(rgb), "d.png", channels=1)[..., 0].astype(int)
            - np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
        ).max()
        <= 1
    )


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate", "packbits"])
@pytest.mark.parametrize("shape", [(6, 9, 3), (6, 9)], ids=["rgb", "gray"])
def test_tiffs_of_every_common_compression_read_with_the_installed_libraries(compression, shape):
    """LZW is the most common TIFF compression, and tifffile alone needs imagecodecs for it: Pillow reads it."""
    pixels = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    data = encode(pixels, "TIFF", **({"compression": compression} if compression else {}))
    expected = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, 2)
    assert np.array_equal(images.read_image(data, "x.tif"), expected)
    gray16 = (np.arange(54).reshape(6, 9) * 1213).astype(np.uint16)
    data16 = encode(gray16, "TIFF", **({"compression": compression} if compression else {}))
    assert np.array_equal(images.read_image(data16, "y.tif", channels=1)[..., 0], np.round(gray16 / 257))


def test_palette_gifs_and_16_bit_pngs_read_as_their_colours_and_levels():
    rgb = np.random.default_rng(3).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    palette_image = Image.fromarray(rgb).quantize(5)
    gif = io.BytesIO()
    palette_image.save(gif, format="GIF")
    assert np.array_equal(images.read_image(gif.getvalue(), "p.gif"), np.asarray(palette_image.convert("RGB")))
    gray16 = np.array([[0, 128, 32896, 65535]], np.uint16)
    assert np.array_equal(images.read_image(png(gray16), "g.png", channels=1)[..., 0], [[0, 0, 128, 255]])


def test_an_unreadable_image_is_named():
    with pytest.raises(ImageError, match=r"^broken\.png: not a readable image"):
        images.read_image(b"\x89PNG\r\n\x1a\n garbage", "broken.png")
    with pytest.raises(ImageError, match=r"^scan\.tif: not a readable image"):
        images.read_image(b"II*\x00 not a tiff", "scan.tif")


def test_mask_encodings():
    binary = params(images="{id}.png", masks="{id}_m.png")
    for foreground in (1, 255):
        mask, ignored = folder.decode_mask(png(np.array([[0, foreground]], np.uint8)), "m.png", binary)
        assert mask.tolist() == [[0, 1]] and ignored is None
    with pytest.raises(ImageError, match=r"^m\.png: mask value 128; binary masks hold 0"):
        folder.decode_mask(png(np.array([[0, 128]], np.uint8)), "m.png", binary)

    index = params(
        images="{id}.png",
        masks="{id}_m.png",
        task="multiclass",
        classes=["bg", "a", "b"],
        mask_encoding="index",
        ignore_value=255,
    )
    palette_mask = Image.fromarray(np.array([[0, 1, 2, 255]], np.uint8), mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [9, 9, 9] * 253)
    buffer = io.BytesIO()
    palette_mask.save(buffer, format="PNG")
    mask, ignored = folder.decode_mask(buffer.getvalue(), "p.png", index)  # a palette PNG: its indices count
    assert mask.tolist() == [[0, 1, 2, 0]] and ignored.tolist() == [[False, False, False, True]]
    with pytest.raises(ImageError, match=r"^g\.png: mask value 3 is not a class index \(0-2\) nor ignore_value 255"):
        folder.decode_mask(png(np.array([[0, 3]], np.uint8)), "g.png", index)

    rgb = params(images="{id}.png", masks="{id}_m.png", task="multiclass", classes=RGB_CLASSES, mask_encoding="rgb")
    colors = np.array([[[0, 0, 0], [220, 20, 60], [0, 0, 142]]], np.uint8)
    assert folder.decode_mask(png(colors), "r.png", rgb)[0].tolist() == [[0, 1, 2]]
    with pytest.raises(ImageError, match=r"^r\.png: colour \[1, 2, 3\] is no class's colour \(classes: background"):
        folder.decode_mask(png(np.array([[[1, 2, 3]]], np.uint8)), "r.png", rgb)


# ------------------------------------------------------------------------------------------ prepare


def test_a_binary_folder_with_validity_masks(tmp_path):
    raw = write_binary_folder(tmp_path / "leaves", n=10)
    meta, splits, summary = prepare(raw, **BINARY, classes=["background", "leaf"])
    assert (meta.name, meta.task, meta.classes) == ("leaves", "binary", ["background", "leaf"])
    # The ratio split draws each id's split from a hash of the seed and the id (folder.ratio_split): about 20 %
    # in val and in test, exactly so only on average; every id in exactly one split, none of them empty.
    ids = [f"{i:03d}" for i in range(10)]
    assert sorted(i for s in splits.values() for i in s.ids.tolist()) == ids
    assert all(1 <= len(splits[s]) <= 4 for s in ("val", "test")) and len(splits["train"]) >= 4
    drawn = folder.ratio_split(ids, params(**BINARY).split, "leaves.prepare")
    assert {s: split.ids.tolist() for s, split in splits.items()} == {s: sorted(drawn[s]) for s in splits}
    for split in splits.values():
        for sample in split.samples():
            sample.check("x", 2)
        assert split.images.shape[1:] == (40, 48, 3) and split.fov is not None
        for i, file_id in enumerate(split.ids):  # the mask and validity mask of each id, pixel for pixel
            mask = np.asarray(Image.open(raw / f"masks/{file_id}_mask.png")) // 255
            valid = np.asarray(Image.open(raw / f"valid/{file_id}.gif").convert("L")) > 0
            assert np.array_equal(split.masks[i], mask) and np.array_equal(split.fov[i], valid)
    assert summary["unused_ids"] == 0 and summary["image_size"] == [40, 48]
    # The same seed, the same split; another seed, another one.
    again = prepare(raw, **BINARY)[1]
    assert all(np.array_equal(again[s].ids, splits[s].ids) for s in splits)
    other = prepare(raw, **{**BINARY, "split": {**BINARY["split"], "seed": 1}})[1]
    assert not np.array_equal(other["test"].ids, splits["test"].ids)


def test_an_rgb_coded_multiclass_zip_with_a_split_file(tmp_path):
    raw = tmp_path / "scenes"
    write_rgb_zip(raw / "scenes.zip")
    meta, splits, _ = prepare(
        raw,
        images="scenes.zip/photos/{id}.png",
        masks="scenes.zip/labels/{id}.png",
        task="multiclass",
        classes=RGB_CLASSES,
        mask_encoding="rgb",
        split={"method": "file", "file": "scenes.zip/split.txt"},
    )
    assert meta.classes == ["background", "disc", "square"] and meta.colors == [c["color"] for c in RGB_CLASSES]
    assert splits["val"].ids.tolist() == ["s08", "s09"] and splits["test"].ids.tolist() == ["s10", "s11"]
    assert splits["train"].fov is None  # nothing to leave out: every pixel is scored
    assert set(np.unique(splits["train"].masks)) == {0, 1, 2}


def test_mixed_sizes_keep_their_own_sizes_and_scale_resizes(tmp_path):
    raw = tmp_path / "mixed"
    (raw / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {"0": (20, 30), "1": (24, 16), "2": (20, 30), "3": (18, 18)}
    images = {i: rng.integers(0, 256, (*size, 3)).astype(np.uint8) for i, size in sizes.items()}
    for i, size in sizes.items():
        (raw / f"img/{i}.png").write_bytes(png(images[i]))
        (raw / f"img/{i}_label.png").write_bytes(png(np.ones(size, np.uint8)))
    raw_params = {
        "images": "img/{id}.png",
        "masks": "img/{id}_label.png",
        "split": {"method": "ids", "val_ids": ["2"], "test_ids": ["3"]},
    }
    _, splits, summary = prepare_splits(raw, **raw_params)
    assert summary["image_size"] == [24, 30] and summary["image_sizes"] == 3  # the largest sides, the sizes
    train = splits["train"]  # images 0 and 1: 20 x 30 and 24 x 16, in one split
    assert train.ids == ["0", "1"] and train.sizes == [(20, 30), (24, 16)] and not train.uniform
    for split in splits.values():
        assert not split.has_fov  # neither valid nor ignore_value: every pixel is scored, nothing padded
        for sample in split:  # each image, unpadded, at its own size
            assert sample.fov is None and sample.mask.shape == sizes[sample.id] and sample.mask.all()
            np.testing.assert_array_equal(sample.image, images[sample.id])
    with pytest.raises(PreparedDataError, match="images of 2 sizes cannot be stacked"):
        load_split(train.directory, "train")
    # ignore_value gives every sample a field of view of its own size (here nothing is ignored).
    _, ignoring, _ = prepare_splits(raw, **raw_params, mask_encoding="index", ignore_value=255)
    for split in ignoring.values():
        assert split.has_fov
        for sample in split:
            assert sample.fov.shape == sizes[sample.id] and sample.fov.all()
    _, halved, summary = prepare_splits(raw, **raw_params, scale=0.5)
    halved_sizes = {"0": (10, 15), "1": (12, 8), "2": (10, 15), "3": (9, 9)}
    assert summary["image_size"] == [12, 15] and summary["image_sizes"] == 3
    for split in halved.values():
        for sample in split:
            assert sample.image.shape == (*halved_sizes[sample.id], 3) and sample.mask.shape == halved_sizes[sample.id]
            assert sample.mask.all()
    # The scale is recorded in meta.json, so that the model file tells predict to resize new images alike; a
    # dataset that is not resized keeps the very meta.json it had before the field existed.
    plain = {"name": "mixed", "task": "binary", "classes": ["background", "foreground"]}
    plain["colors"] = folder.DEFAULT_COLORS[:2]
    assert json.loads((Path(train.directory) / "meta.json").read_text()) == plain
    assert load_meta(train.directory).scale == 1
    assert json.loads((Path(halved["train"].directory) / "meta.json").read_text()) == {**plain, "scale": 0.5}
    assert load_meta(halved["train"].directory).scale == 0.5


def write_pairs(root: Path, ids, size=(8, 8), mask_size=None, mask_value=255):
    root.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (root / f"{i}.png").write_bytes(png(np.zeros((*size, 3), np.uint8)))
        (root / f"{i}_mask.png").write_bytes(png(np.full(mask_size or size, mask_value, np.uint8)))


PAIRS = {"images": "{id}.png", "masks": "{id}_mask.png", "split": {"method": "ratio", "val": 0.25, "test": 0.25}}


def test_each_mistake_names_its_file(tmp_path):
    write_pairs(tmp_path / "a", ["1", "2", "3", "4"])
    (tmp_path / "a/5.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ImageError, match=r"^5\.png: no file matches a\.prepare\.masks '\{id\}_mask\.png' for id '5'"):
        prepare(tmp_path / "a", **PAIRS)
    write_pairs(tmp_path / "b", ["1", "2", "3"])
    (tmp_path / "b/9_mask.png").write_bytes(png(np.zeros((8, 8), np.uint8)))
    with pytest.raises(ImageError, match=r"^9_mask\.png: no image matches b\.prepare\.images"):
        prepare(tmp_path / "b", **PAIRS)
    write_pairs(tmp_path / "c", ["1", "2", "3"])
    write_pairs(tmp_path / "c", ["4"], mask_size=(8, 9))
    with pytest.raises(ImageError, match=r"^4_mask\.png: 9 x 8 pixels, but its image 4\.png has 8 x 8"):
        prepare(tmp_path / "c", **PAIRS)
    write_pairs(tmp_path / "d", ["1", "2", "3"])
    write_pairs(tmp_path / "d", ["4"], mask_value=7)
    with pytest.raises(ImageError, match=r"^4_mask\.png: mask value 7"):
        prepare(tmp_path / "d", **PAIRS)
    write_pairs(tmp_path / "e", ["1", "2", "3"])
    (tmp_path / "e/2.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"^2\.png: not a readable image"):
        prepare(tmp_path / "e", **PAIRS)
    with pytest.raises(ImageError, match=r"^e\.prepare\.images: no file matches '\{id\}\.jpg' \(files: 1\.png"):
        prepare(tmp_path / "e", **{**PAIRS, "images": "{id}.jpg"})
    write_pairs(tmp_path / "f", ["a b", "2", "3"])
    with pytest.raises(ImageError, match=r"^a b_mask\.png: its id 'a b' .from f\.prepare\.masks. is not a plain name"):
        prepare(tmp_path / "f", **PAIRS)


def test_split_mistakes(tmp_path):
    write_pairs(tmp_path / "a", ["1", "2"])
    with pytest.raises(
        ParamError, match=r"params\.yaml: a\.prepare\.split: 2 images cannot make train, val and test splits"
    ):
        prepare(tmp_path / "a", **PAIRS)
    write_pairs(tmp_path / "b", ["1", "2", "3", "4"])
    ids = {"method": "ids", "val_ids": ["1"], "test_ids": ["7"]}
    with pytest.raises(ParamError, match=r"params\.yaml: b\.prepare\.split\.test_ids: id '7' has no image"):
        prepare(tmp_path / "b", **{**PAIRS, "split": ids})
    with pytest.raises(ParamError, match=r"split\.test_ids: id '1' is in both val and test"):
        prepare(tmp_path / "b", **{**PAIRS, "split": {**ids, "test_ids": ["1"]}})
    with pytest.raises(ParamError, match=r"b\.prepare\.split: the train split is empty"):
        prepare(tmp_path / "b", **{**PAIRS, "split": {**ids, "test_ids": ["2"], "train_ids": []}})
    (tmp_path / "b/split.txt").write_text("1 train\n2 train\n3 val\n4 tset\n")
    with pytest.raises(ImageError, match=r"^split\.txt:4: expected '<id> <split>'"):
        prepare(tmp_path / "b", **{**PAIRS, "split": {"method": "file", "file": "split.txt"}})
    (tmp_path / "b/split.txt").write_text("1,train\n2,train\n3,val\n")
    with pytest.raises(ParamError, match=r"b\.prepare\.split: the test split is empty"):
        prepare(tmp_path / "b", **{**PAIRS, "split": {"method": "file", "file": "split.txt"}})


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"images": "images/*.png", "masks": "m/{id}.png"}, r"toy\.prepare\.images: must hold \{id\} exactly once"),
        ({**PAIRS, "task": "multiclass"}, r"toy\.prepare\.classes: a multiclass task needs its class names"),
        ({**PAIRS, "classes": ["a", "b", "c"]}, r"toy\.prepare\.classes: a binary task has 2 classes"),
        ({**PAIRS, "mask_encoding": "rgb"}, r"toy\.prepare\.classes: rgb masks need a color for every class"),
        ({**PAIRS, "ignore_value": 255}, r"toy\.prepare\.ignore_value: applies to index masks only"),
        ({**PAIRS, "channels": 2}, r"toy\.prepare\.channels: must be 1 or 3"),
        (
            {**PAIRS, "split": {"method": "ratio", "val": 0.5, "test": 0.5}},
            r"toy\.prepare\.split: val \+ test must leave",
        ),
        ({**PAIRS, "mask": "x"}, r"toy\.prepare\.mask: unknown parameter"),
    ],
)
def test_bad_params(raw, message):
    with pytest.raises(ParamError, match=message):
        params(**raw)


# ------------------------------------------------------------------------------------------ the stage


def test_the_prepare_stage_finds_the_kind_in_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_binary_folder(tmp_path / "data/raw/leaves", n=6)
    config = {"datasets": {"leaves": "folder"}, "leaves": {"prepare": BINARY}}
    Path("params.yaml").write_text(yaml.safe_dump(config))
    assert prepare_stage.prepare("leaves").startswith("prepare leaves: train 4, val 1, test 1 images")
    assert load_meta("data/prepared/leaves").task == "binary" and len(load_split("data/prepared/leaves", "test")) == 1
    record = json.loads(Path("metrics/leaves/data.json").read_text())
    assert [s["split"] for s in record["splits"]] == ["train", "val", "test"]

    Path("params.yaml").write_text(yaml.safe_dump({**config, "datasets": {"leaves": "foldr"}}))
    with pytest.raises(ParamError, match=r"datasets\.leaves: no kind 'foldr' .*kinds: folder, mnist, stare"):
        prepare_stage.prepare("leaves")
    Path("params.yaml").write_text(yaml.safe_dump({**config, "datasets": ["leaves"]}))
    with pytest.raises(ParamError, match=r"params\.yaml: datasets: expected a mapping of dataset name to kind"):
        prepare_stage.prepare("leaves")
