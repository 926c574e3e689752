"""MNIST as an 11-class segmentation task: class 0 is background, digit d is class d + 1.

A pixel is foreground when ``pixel / 255 > threshold`` (the tutorial's 0.2); its class is the image's label.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.archives import gunzip
from pipeline.params import ParamError, require
from pipeline.plans import Plan, Source
from pipeline.prepared import TAB10_COLORS, DatasetMeta, PreparedSplit, Sample
from pipeline.stage import StageError

VERSION = 1  # of what this kind decodes: bumped by any change to the samples it makes (pipeline.plans.recipe)


@dataclass(frozen=True)
class PrepareParams:
    threshold: float = 0.2
    val_size: int = 10_000
    train_size: int | None = None  # None: every training image not held out for validation
    test_size: int | None = None  # None: the whole official test set
    seed: int = 0

    def validate(self, key: str) -> None:
        require(0 <= self.threshold < 1, f"{key}.threshold", f"must be in [0, 1), got {self.threshold}")
        require(self.val_size >= 1, f"{key}.val_size", f"must be >= 1, got {self.val_size}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{key}.{name}", f"must be >= 1 or null, got {value}")


FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
PARAMS_KEY = "mnist.prepare"  # where the parameters live in params.yaml, for error messages
IMAGE_SIZE = (28, 28)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x0000 0x08 (uint8) 0x03 / 0x01 (number of dimensions)
CLASSES = ["background"] + [f"digit {d}" for d in range(10)]
COLORS = TAB10_COLORS


def parse_idx(data: bytes, name: str, magic: int) -> np.ndarray:
    """Decode an uncompressed IDX file (uint8 payload), checking its magic number and declared size."""
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise StageError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise StageError(f"{name}: bad magic number {found:#010x}, expected {magic:#010x}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise StageError(f"{name}: {len(data)} bytes, but its header {shape} implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_split(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    arrays = []
    for file, magic in ((images_file, IMAGES_MAGIC), (labels_file, LABELS_MAGIC)):
        try:
            data = (raw_dir / file).read_bytes()
        except OSError as e:
            raise StageError(f"{raw_dir / file}: cannot be read ({e.strerror}); run the download stage first") from None
        arrays.append(parse_idx(gunzip(data, file), file, magic))
    images, labels = arrays
    # The header declares the shape: a file re-declaring 10000 x 784 x 1 has the right byte count, wrong images.
    if images.shape[1:] != IMAGE_SIZE:
        raise StageError(f"{images_file}: images of {images.shape[1:]} pixels, MNIST's are {IMAGE_SIZE}")
    if len(images) != len(labels):
        raise StageError(f"{images_file} has {len(images)} images but {labels_file} has {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise StageError(f"{labels_file}: label {labels.max()} is not a digit")
    return images, labels


def threshold_masks(images: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """``(pixel / 255 > threshold) * (label + 1)`` as uint8 class indices."""
    foreground = images.astype(np.float32) / 255 > threshold
    return (foreground * (labels.astype(np.uint8) + 1)[:, None, None]).astype(np.uint8)


def tally(samples: list[Sample]) -> dict:
    """Pixels per class."""
    if not samples:
        return {}
    masks = np.stack([s.mask for s in samples])  # a comparison per class: bincount would widen each pixel to 64 bits
    return {"pixels": np.array([np.count_nonzero(masks == c) for c in range(len(CLASSES))], np.int64)}


def summarize(tallies: dict[str, dict], splits: dict[str, PreparedSplit], threshold: float) -> dict:
    """The threshold, and per split its images, foreground pixels and pixels per class."""
    out: dict = {"threshold": threshold}
    for name, split in splits.items():
        counts = tallies[name].get("pixels", np.zeros(len(CLASSES), np.int64))
        out[name] = {
            "images": len(split),
            "foreground_pixels": int(counts[1:].sum()),
            "pixels_per_class": {cls: int(n) for cls, n in zip(CLASSES, counts)},
        }
    return out


# The decoded IDX files of the plan being prepared, shared with the forked decoding workers.
_RAW: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def decode(sources: list[Source], threshold: float) -> list[Sample]:
    """Images ``(split, index)`` of the official files and their masks (thresholded together: they are tiny)."""
    samples = []
    for official in ("train", "test"):
        chosen = [s for s in sources if s.payload[0] == official]
        if not chosen:
            continue
        images, labels = _RAW[official]
        index = np.array([s.payload[1] for s in chosen])
        masks = threshold_masks(images[index], labels[index], threshold)
        samples += [
            Sample(s.id, np.ascontiguousarray(images[i, :, :, None]), mask) for s, i, mask in zip(chosen, index, masks)
        ]
    order = {s.id: n for n, s in enumerate(sources)}
    return sorted(samples, key=lambda sample: order[sample.id])


def plan(raw_dir: Path, params: PrepareParams) -> Plan:
    train_images, train_labels = load_split(raw_dir, "train")
    test_images, test_labels = load_split(raw_dir, "test")

    available = {
        "val_size": len(train_images) - 1,
        "train_size": len(train_images) - params.val_size,
        "test_size": len(test_images),
    }
    for key, limit in available.items():
        value = getattr(params, key)
        if value is not None and value > limit:
            raise ParamError(
                f"{PARAMS_KEY}.{key}: {value} is more than the {limit} images available"
                + (" (one training image must remain)" if key == "val_size" else "")
            )
    # Seeded split: the same seed gives the same validation images on every machine.
    order = np.random.default_rng(params.seed).permutation(len(train_images))
    val_index = np.sort(order[: params.val_size])
    train_index = np.sort(order[params.val_size :][: params.train_size])
    test_index = np.arange(len(test_images))[: params.test_size]
    _RAW.update(train=(train_images, train_labels), test=(test_images, test_labels))

    def sources(official: str, index: np.ndarray) -> list[Source]:
        images, labels = _RAW[official]
        digests = [hashlib.sha256(images[i].tobytes() + labels[i].tobytes()).hexdigest() for i in index]
        return [Source(f"{official}-{i:05d}", digest, (official, int(i))) for i, digest in zip(index, digests)]

    splits = {"train": sources("train", train_index), "val": sources("train", val_index)}
    meta = DatasetMeta(name="mnist", task="multiclass", classes=CLASSES, colors=COLORS)
    return Plan(
        meta,
        {**splits, "test": sources("test", test_index)},
        functools.partial(decode, threshold=params.threshold),
        tally,
        functools.partial(summarize, threshold=params.threshold),
        chunk=2048,
        parallel=False,
    )  # thresholding 70,000 tiny images takes less than sending them between processes
