import gzip

import numpy as np
import pytest

from pipeline.datasets import mnist
from pipeline.datasets.mnist import PrepareParams as MnistPrepareParams
from pipeline.params import ParamError
from pipeline.stage import StageError
from tests.prepare_kind import prepare_kind
from tests.synthetic import idx_bytes


def write_mnist(directory, n_train=30, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images_file, labels_file = mnist.FILES[split]
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (directory / images_file).write_bytes(gzip.compress(idx_bytes(images, mnist.IMAGES_MAGIC)))
        (directory / labels_file).write_bytes(gzip.compress(idx_bytes(labels, mnist.LABELS_MAGIC)))


def test_parse_idx_roundtrip():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = mnist.parse_idx(idx_bytes(images, mnist.IMAGES_MAGIC), "x", mnist.IMAGES_MAGIC)
    np.testing.assert_array_equal(parsed, images)


def test_parse_idx_rejects_bad_magic():
    data = idx_bytes(np.zeros((2, 3, 4), np.uint8), mnist.IMAGES_MAGIC)
    with pytest.raises(StageError, match=r"images\.idx: bad magic number 0x00000803, expected 0x00000801"):
        mnist.parse_idx(data, "images.idx", mnist.LABELS_MAGIC)


def test_parse_idx_rejects_truncated_file():
    data = idx_bytes(np.zeros((2, 3, 4), np.uint8), mnist.IMAGES_MAGIC)
    with pytest.raises(StageError, match=r"images\.idx: 39 bytes, but its header \(2, 3, 4\) implies 40"):
        mnist.parse_idx(data[:-1], "images.idx", mnist.IMAGES_MAGIC)
    with pytest.raises(StageError, match="too short"):
        mnist.parse_idx(data[:6], "images.idx", mnist.IMAGES_MAGIC)


def test_threshold_masks_follow_the_tutorial_rule():
    # 0.2 * 255 = 51: 51 is not above the threshold, 52 is.
    images = np.array([[[0, 51, 52, 255]], [[52, 0, 0, 200]]], dtype=np.uint8)
    labels = np.array([3, 9], dtype=np.uint8)
    masks = mnist.threshold_masks(images, labels, 0.2)
    np.testing.assert_array_equal(masks, [[[0, 0, 4, 4]], [[10, 0, 0, 10]]])
    assert masks.dtype == np.uint8


def test_prepare_splits_are_seeded_and_disjoint(tmp_path):
    raw = tmp_path / "raw"
    write_mnist(raw, n_train=30, n_test=10)
    params = MnistPrepareParams(threshold=0.2, val_size=8, train_size=None, test_size=5, seed=1)
    meta, splits, summary = prepare_kind(mnist, raw, params, tmp_path / "prepared")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [22, 8, 5]
    assert not set(splits["train"].ids) & set(splits["val"].ids)
    assert splits["train"].images.shape == (22, 28, 28, 1)
    _, again, _ = prepare_kind(mnist, raw, params, tmp_path / "again")
    np.testing.assert_array_equal(again["val"].ids, splits["val"].ids)
    _, other_seed, _ = prepare_kind(mnist, raw, MnistPrepareParams(val_size=8, seed=2), tmp_path / "other_seed")
    assert list(other_seed["val"].ids) != list(splits["val"].ids)
    assert meta.task == "multiclass" and len(meta.classes) == 11 == len(meta.colors)
    test = splits["test"]
    assert summary["test"]["foreground_pixels"] == int((test.masks > 0).sum())
    assert sum(summary["test"]["pixels_per_class"].values()) == 5 * 28 * 28


def test_prepare_rejects_mismatched_label_count(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=10)
    labels_file = mnist.FILES["test"][1]
    (tmp_path / labels_file).write_bytes(gzip.compress(idx_bytes(np.zeros(9, np.uint8), mnist.LABELS_MAGIC)))
    with pytest.raises(StageError, match="t10k-images-idx3-ubyte.gz has 10 images but t10k-labels-idx1-ubyte.gz has 9"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=5), tmp_path / "prepared")


def test_prepare_rejects_val_size_larger_than_the_data(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=10)
    with pytest.raises(ParamError, match=r"mnist\.prepare\.val_size: 30 is more than the 29 images available"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=30), tmp_path / "prepared")
    with pytest.raises(ParamError, match=r"mnist\.prepare\.train_size: 26 is more than the 25 images available"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=5, train_size=26), tmp_path / "prepared")
    with pytest.raises(ParamError, match=r"mnist\.prepare\.test_size: 11 is more than the 10 images available"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=5, test_size=11), tmp_path / "prepared")


def test_prepare_rejects_images_that_are_not_28_by_28(tmp_path):
    # The same byte count as 10 images of 28 x 28, declared as 10 x 784 x 1 in the IDX header.
    write_mnist(tmp_path, n_train=30, n_test=10)
    images_file = mnist.FILES["test"][0]
    flat = np.zeros((10, 784, 1), np.uint8)
    (tmp_path / images_file).write_bytes(gzip.compress(idx_bytes(flat, mnist.IMAGES_MAGIC)))
    with pytest.raises(StageError, match=r"t10k-images-idx3-ubyte.gz: images of \(784, 1\) pixels"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=5), tmp_path / "prepared")


def test_a_directory_instead_of_a_raw_file(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=10)
    path = tmp_path / mnist.FILES["train"][1]
    path.unlink()
    path.mkdir()
    with pytest.raises(StageError, match="train-labels-idx1-ubyte.gz: cannot be read"):
        prepare_kind(mnist, tmp_path, MnistPrepareParams(val_size=5), tmp_path / "prepared")
