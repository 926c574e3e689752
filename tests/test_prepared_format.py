"""The prepared format (pipeline/prepared.py): shards read sample by sample, kept when unchanged, checked on
opening; the folder kind's stable split; memory bounded by a sample, not the dataset."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from pipeline.datasets.folder import SplitParams, ratio_split
from pipeline.prepared import (
    INDEX,
    DatasetMeta,
    PreparedDataError,
    Sample,
    dataset_digest,
    open_split,
    open_splits,
    write_samples,
)
from tests.folder_data import png
from tests.training_hooks import with_hooks

REPO = Path(__file__).resolve().parents[1]
META = DatasetMeta(
    name="toy", task="multiclass", classes=["background", "a", "b"], colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]]
)


def sample(
    rng: np.random.Generator, image_id: str, size: tuple[int, int], fov: bool = True, reference: bool = False
) -> Sample:
    h, w = size
    return Sample(
        image_id,
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        rng.integers(0, 3, (h, w), dtype=np.uint8),
        rng.random((h, w)) > 0.2 if fov else None,
        rng.integers(0, 3, (h, w), dtype=np.uint8) if reference else None,
    )


def write(directory: Path, splits: dict[str, list[Sample]], shard_bytes: int = 4000, block_bytes: int = 1500) -> None:
    write_samples(directory, META, splits, shard_bytes, block_bytes)


def same(a: Sample, b: Sample) -> bool:
    return a.id == b.id and all(
        (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y))
        for x, y in ((a.image, b.image), (a.mask, b.mask), (a.fov, b.fov), (a.reference, b.reference))
    )


def shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("*.tar")}


@pytest.fixture
def dataset(tmp_path):
    """Images of three sizes in many small shards, the test split with reference masks, the val split empty."""
    rng = np.random.default_rng(0)
    sizes = [(20, 30), (20, 30), (17, 9), (20, 30), (33, 33), (17, 9), (20, 30), (20, 30)]
    train = [sample(rng, f"t{i:02d}", size) for i, size in enumerate(sizes * 2)]
    test = [sample(rng, f"s{i:02d}", size, reference=True) for i, size in enumerate(sizes[:5])]
    directory = tmp_path / "prepared"
    write(directory, {"train": train, "test": test})
    return directory, {"train": train, "test": test}


def test_round_trip_keeps_every_array_and_size(dataset):
    directory, written = dataset
    assert len(shards(directory)) > 4  # many shards of a few blocks each
    splits = open_splits(directory)
    for name, samples in written.items():
        split = splits[name]
        assert split.ids == sorted(s.id for s in samples) and split.channels == 3
        by_id = {s.id: s for s in samples}
        assert all(same(by_id[s.id], s) for s in split)  # in id order, whatever the shards
        assert split.sizes == [by_id[i].image.shape[:2] for i in split.ids]
        assert split.has_fov and split.has_reference == (name == "test")
    assert len(splits["val"]) == 0 and list(splits["val"]) == []
    # Batches stack images of one size only; their reads are the same samples.
    train = splits["train"]
    for indices, samples in train.batches(3):
        assert 1 <= len(samples) <= 3 and len({s.image.shape for s in samples}) == 1
        assert all(same(train.read(i), s) for i, s in zip(indices, samples))
    # A shard is a plain tar of .npy blocks that numpy reads back.
    with tarfile.open(next(directory.glob("train-*.tar"))) as tar:
        names = tar.getnames()
        assert names and all(n.endswith((".image.npy", ".mask.npy", ".fov.npy")) for n in names)
        first = np.load(io.BytesIO(tar.extractfile(names[0]).read()), allow_pickle=False)
        assert first.dtype == np.uint8 and first.ndim == 4


def test_a_forked_reader_reads_on_its_own(dataset):
    directory, _ = dataset
    split = open_split(directory, "train")
    expected = split.read(3)
    pid = os.fork()
    if pid == 0:  # the loader's worker does this
        os._exit(0 if same(split.read(3), expected) else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert same(split.read(3), expected)


def test_appending_keeps_every_old_shard_byte_for_byte(dataset):
    directory, written = dataset
    before = shards(directory)
    rng = np.random.default_rng(1)
    added = [sample(rng, f"u{i:02d}", (20, 30)) for i in range(2)]
    write(directory, {"train": written["train"] + added, "test": written["test"]})
    after = shards(directory)
    assert all(after[name] == data for name, data in before.items())  # every old shard, unchanged
    new = set(after) - set(before)
    assert new and all(name.startswith("train-") for name in new)
    assert sum(len(after[name]) for name in new) < 0.25 * sum(len(d) for d in before.values())
    split = open_split(directory, "train")
    assert split.ids == sorted(s.id for s in written["train"] + added)
    # The same data written at once reads the same, sample for sample, in the same order.
    once = directory.parent / "once"
    write(once, {"train": written["train"] + added, "test": written["test"]})
    assert all(same(a, b) for a, b in zip(open_split(once, "train"), split))


def test_removing_or_changing_an_image_rewrites_its_shard_only(dataset):
    directory, written = dataset
    before = shards(directory)
    train = [s for s in written["train"] if s.id != "t05"]
    changed = written["test"][0]
    test = [Sample(changed.id, 255 - changed.image, changed.mask, changed.fov, changed.reference)] + written["test"][1:]
    write(directory, {"train": train, "test": test})
    after = shards(directory)
    gone = set(before) - set(after)
    assert len(gone) == 2 and len(set(before) & set(after)) == len(before) - 2
    assert "t05" not in open_split(directory, "train").ids
    assert same(open_split(directory, "test").read(0), test[0])


def test_a_shard_or_index_tampered_with_or_cut_short_is_refused_naming_the_file(dataset):
    directory, _ = dataset
    shard = sorted(directory.glob("train-*.tar"))[0]
    data = shard.read_bytes()

    shard.write_bytes(data[:-1000])
    with pytest.raises(PreparedDataError, match=rf"{shard}: .* bytes, the index records .*truncated"):
        open_split(directory, "train")
    shard.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    with pytest.raises(PreparedDataError, match=rf"{shard}: its sha256 differs from the index's"):
        open_split(directory, "train")
    shard.unlink()
    with pytest.raises(PreparedDataError, match=rf"{shard}: cannot be read"):
        open_split(directory, "train")
    shard.write_bytes(data)
    open_split(directory, "train")

    index_path = directory / INDEX
    text = index_path.read_text()
    index = json.loads(text)
    index["splits"]["train"][0]["blocks"][0]["image"] = index["splits"]["train"][0]["bytes"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(PreparedDataError, match=rf"{index_path}: shard .*: the image block of .* lies outside"):
        open_split(directory, "train")
    index_path.write_text(text[: len(text) // 2])
    with pytest.raises(PreparedDataError, match=rf"{index_path}: not a readable index"):
        open_split(directory, "train")
    index_path.unlink()
    with pytest.raises(PreparedDataError, match=rf"{index_path}: not found; run the prepare stage first"):
        open_split(directory, "train")


def test_a_mask_with_a_class_the_dataset_lacks_is_refused_when_read(tmp_path):
    rng = np.random.default_rng(0)
    bad = sample(rng, "x", (8, 8))
    bad.mask[0, 0] = 7
    with pytest.raises(PreparedDataError, match="mask of x holds class 7; the dataset has 3 classes"):
        write(tmp_path / "p", {"train": [bad], "test": [sample(rng, "y", (8, 8))]})
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_an_empty_train_or_test_split_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(PreparedDataError, match="test: holds no images; the test split needs at least one"):
        write(tmp_path / "p", {"train": [sample(rng, "x", (8, 8))]})
    assert not (tmp_path / "p").exists()


def test_the_ratio_split_moves_no_image_when_others_are_added_or_removed():
    params = SplitParams(val=0.15, test=0.15, seed=3)
    ids = [f"img{i:04d}" for i in range(400)]
    first = ratio_split(ids, params, "x.prepare")
    assert 0.10 < len(first["test"]) / 400 < 0.20 and 0.10 < len(first["val"]) / 400 < 0.20
    grown = ratio_split(ids + [f"new{i:03d}" for i in range(40)], params, "x.prepare")
    shrunk = ratio_split(ids[50:], params, "x.prepare")
    for split in ("train", "val", "test"):
        assert set(first[split]) <= set(grown[split])
        assert set(first[split]) - set(ids[:50]) == set(shrunk[split])
    other_seed = ratio_split(ids, SplitParams(val=0.15, test=0.15, seed=4), "x.prepare")
    assert other_seed["test"] != first["test"]
    # A handful of images still gets a test (and val) split.
    tiny = ratio_split(["a", "b", "c"], params, "x.prepare")
    assert all(len(tiny[name]) == 1 for name in ("train", "val", "test"))


def folder_project(root: Path, n: int) -> None:
    """A folder dataset of ``n`` RGB images of 384 x 384 in data/raw/big, and its params."""
    rng = np.random.default_rng(0)
    raw = root / "data/raw/big"
    (raw / "images").mkdir(parents=True)
    (raw / "masks").mkdir()
    base = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    for i in range(n):
        (raw / "images" / f"{i:04d}.png").write_bytes(png(np.roll(base, i, axis=0), compress_level=0))
        (raw / "masks" / f"{i:04d}.png").write_bytes(png((np.roll(base[..., 0], i, axis=1) > 128).astype(np.uint8)))
    params = {
        "datasets": {"big": "folder"},
        "big": {
            "prepare": {"images": "images/{id}.png", "masks": "masks/{id}.png", "split": {"val": 0.1, "test": 0.1}},
            "train": {
                "arch": "simple_unet",
                "width": 4,
                "epochs": 1,
                "batch_size": 4,
                "patch_size": 64,
                "samples_per_epoch": 8,
                "val_batch_size": 1,
                "lr": 0.01,
                "loss": "bce",
            },
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def peak_rss(root: Path, stage: str) -> int:
    """Peak resident bytes of ``python -m pipeline.<stage> big`` and its children, polled."""
    env = with_hooks({**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    process = subprocess.Popen(
        [sys.executable, "-m", f"pipeline.{stage}", "big"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tree, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)]))
        except psutil.Error:
            pass
        try:
            process.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass
    assert process.returncode == 0, process.stdout.read()
    return peak


def test_memory_does_not_grow_with_the_dataset(tmp_path):
    """Prepare and train on 8 and on 64 images of 384 x 384 (3.5 MB and 28 MB decoded, 2 and 15 shards of
    2 MB): the peak resident memory of each stage grows by far less than the data."""
    small, large = tmp_path / "small", tmp_path / "large"
    folder_project(small, 8)
    folder_project(large, 64)
    peaks = {}
    env_shards = {"SEGPIPE_TEST_SHARD_BYTES": str(2 * 2**20)}
    os.environ.update(env_shards)
    try:
        for root in (small, large):
            peaks[root.name] = {stage: peak_rss(root, stage) for stage in ("prepare", "train")}
    finally:
        for key in env_shards:
            del os.environ[key]
    assert len(list((large / "data/prepared/big").glob("train-*.tar"))) >= 8
    grown = {stage: peaks["large"][stage] - peaks["small"][stage] for stage in ("prepare", "train")}
    data = 56 * 384 * 384 * 4  # the decoded bytes the large dataset adds
    assert all(growth < data / 3 for growth in grown.values()), (grown, data)


def test_prepare_writes_the_same_bytes_whatever_the_number_of_processes(tmp_path, monkeypatch):
    """The same shards, index and summary from 1, 2 or 3 processes, and from 2 whose arrays are too large for
    the shared slots (sent through the pool's pipe); a second run keeps every shard; after images are removed,
    the summary tallied from kept shards is the one a fresh prepare writes."""
    from pipeline import plans, prepare, prepared

    folder_project(tmp_path, 10)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prepared, "SHARD_BYTES", 2**20)
    prepared, summary = tmp_path / "data/prepared/big", tmp_path / "metrics/big/data.json"

    def output() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in [*prepared.iterdir(), summary]}

    outputs = []
    for processes, slot_bytes in ((1, plans.SLOT_BYTES), (2, plans.SLOT_BYTES), (3, plans.SLOT_BYTES), (2, 1000)):
        monkeypatch.setattr(plans, "decoding_processes", lambda processes=processes: processes)
        monkeypatch.setattr(plans, "SLOT_BYTES", slot_bytes)
        shutil.rmtree(prepared, ignore_errors=True)
        assert "(10 decoded, 0 kept)" in prepare.prepare("big")
        outputs.append(output())
    assert len(outputs[0]) > 5 and all(out == outputs[0] for out in outputs)
    # Run again over its own output: every shard is kept, nothing is decoded.
    assert "(0 decoded, 10 kept)" in prepare.prepare("big")
    assert output() == outputs[0]
    for i in (3, 7):
        for role in ("images", "masks"):
            (tmp_path / f"data/raw/big/{role}/{i:04d}.png").unlink()
    assert " kept)" in (message := prepare.prepare("big")) and "(0 decoded" in message, message
    after_removal = output()
    assert after_removal != outputs[0]
    shutil.rmtree(prepared)
    assert "(8 decoded, 0 kept)" in prepare.prepare("big")
    assert output() == after_removal


def test_the_fingerprints_follow_the_params_and_versions_not_the_codes_text():
    """An edit that changes nothing prepare writes must leave the index (and every stage after it) as it is."""
    from pipeline import plans
    from pipeline.datasets import mnist

    params = mnist.PrepareParams()
    first = plans.recipe("mnist", mnist, params)
    assert plans.recipe("mnist", mnist, mnist.PrepareParams()) == first
    assert plans.recipe("mnist", mnist, mnist.PrepareParams(threshold=0.3)) != first
    assert plans.recipe("stare", mnist, params) != first

    class Bumped:
        VERSION = mnist.VERSION + 1

    assert plans.recipe("mnist", Bumped, params) != first


def test_the_dataset_digest_sees_content_and_ids(dataset):
    """What a resume state is keyed by: another pixel or another id is another dataset; the same samples written
    again are the same one."""
    directory, written = dataset
    first = dataset_digest(directory)
    write(directory, written)
    assert dataset_digest(directory) == first
    changed = written["test"][0]
    image = changed.image.copy()
    image[0, 0, 0] ^= 1
    write(
        directory,
        {
            **written,
            "test": [Sample(changed.id, image, changed.mask, changed.fov, changed.reference), *written["test"][1:]],
        },
    )
    assert dataset_digest(directory) != first
    write(
        directory,
        {
            **written,
            "test": [
                Sample("z" + changed.id, changed.image, changed.mask, changed.fov, changed.reference),
                *written["test"][1:],
            ],
        },
    )
    assert dataset_digest(directory) != first


def test_a_decoding_worker_that_dies_ends_prepare_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """The kernel's OOM killer takes a decoding worker: prepare stops with an error (multiprocessing.Pool would
    have waited for its result forever) and the previous dataset stays as it was."""
    import signal

    from pipeline import plans, prepare
    from pipeline.datasets import folder

    folder_project(tmp_path, 6)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plans, "decoding_processes", lambda: 2)
    prepare.prepare("big")
    before = {p.name: p.read_bytes() for p in (tmp_path / "data/prepared/big").iterdir()}
    for i in range(6):  # every image new, so that each is decoded again
        path = tmp_path / f"data/raw/big/images/{i:04d}.png"
        path.write_bytes(png(np.zeros((384, 384, 3), np.uint8) + i, compress_level=0))
    decode_sample = folder.decode_sample

    def dies_on_the_third(source, **kwargs):
        if source.id == "0003":
            os.kill(os.getpid(), signal.SIGKILL)
        return decode_sample(source, **kwargs)

    monkeypatch.setattr(folder, "decode_sample", dies_on_the_third)
    with pytest.raises(prepare.StageError, match="a worker process died"):
        prepare.prepare("big")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data/prepared/big").iterdir()} == before
