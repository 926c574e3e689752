"""Any folder of image and mask files, described in params.yaml alone: the ``folder`` kind of dataset.

``<name>.prepare`` says how files pair up (name patterns with ``{id}``), what the masks mean and how ids split;
every mistake is one line naming the file or key. Keys: README, "Add your own dataset"; design: docs/datasets.md.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from pipeline import archives
from pipeline.images import ImageError, as_image, decode, decode_valid, look_up, read_image, resize
from pipeline.params import ParamError, require
from pipeline.plans import Plan, Source, chunks, decoding_processes, each, in_order
from pipeline.prepared import ID_PATTERN, SPLITS, TAB10_COLORS, DatasetMeta, PreparedSplit, Sample
from pipeline.tasks import TASKS

MASK_ENCODINGS = ("binary", "index", "rgb")
SPLIT_METHODS = ("ratio", "ids", "file")
DEFAULT_COLORS = TAB10_COLORS  # overlay colours where params give none
BINARY_CLASSES = list(TASKS["binary"].default_classes)
PAIR_KEYS = {"masks": "mask", "valid": "valid", "reference_masks": "reference"}  # a pattern's key: its file's role
VERSION = 1  # of what this kind decodes: bumped by any change to the samples it makes (pipeline.plans.recipe)


@dataclass(frozen=True)
class ClassParams:
    name: str
    color: list[int] | None = None  # [r, g, b]: the class's colour in rgb masks (required there) and overlays

    def validate(self, key: str) -> None:
        require(bool(self.name.strip()), f"{key}.name", "must not be empty")
        rgb = self.color is None or (len(self.color) == 3 and all(0 <= v <= 255 for v in self.color))
        require(rgb, f"{key}.color", f"must be [r, g, b] with values 0-255, got {self.color}")


@dataclass(frozen=True)
class SplitParams:
    method: str = "ratio"
    val: float = 0.15  # ratio: fractions of all images, at least one image each; val 0: no validation split
    test: float = 0.15
    seed: int = 0
    train_ids: list[str] | None = None  # ids: null takes every image not in val_ids or test_ids
    val_ids: list[str] | None = None  # null or []: no validation split
    test_ids: list[str] | None = None
    file: str | None = None  # file: a name in the dataset's files, one "<id> <split>" per line

    def validate(self, key: str) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, f"{key}.{name}", message)

        need(self.method in SPLIT_METHODS, "method", f"must be one of {list(SPLIT_METHODS)}, got {self.method!r}")
        need(0 <= self.val < 1, "val", f"must be in [0, 1), got {self.val}")
        need(0 < self.test < 1, "test", f"must be in (0, 1), got {self.test}")
        require(
            self.val + self.test < 1, key, f"val + test must leave images to train on, got {self.val} + {self.test}"
        )
        need(self.method != "ids" or bool(self.test_ids), "test_ids", "must list at least one id when method is ids")
        need(self.method != "file" or bool(self.file), "file", "must name a file when method is file")


@dataclass(frozen=True)
class PrepareParams:
    images: str  # name pattern of the images, e.g. "images/{id}.png"
    masks: str  # of their masks, e.g. "masks/{id}_mask.png"
    valid: str | None = None  # of the validity masks (nonzero = scored), if any
    reference_masks: str | None = None  # of a second annotator's masks (the human baseline), if any
    task: str = "binary"
    classes: list[str | ClassParams] | None = None  # names, or {name, color}; binary default: background, foreground
    mask_encoding: str = "binary"
    ignore_value: int | None = None  # index masks: the value of pixels not scored
    channels: int = 3  # of the prepared images: 3 (RGB) or 1 (gray)
    scale: float = 1.0  # resize factor applied to every image and mask
    split: SplitParams = field(default_factory=SplitParams)

    def validate(self, key: str) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, f"{key}.{name}", message)

        for name in ("images", "masks", "valid", "reference_masks"):
            pattern = getattr(self, name)
            need(pattern is None or pattern.count("{id}") == 1, name, f"must hold {{id}} exactly once, got {pattern!r}")
        need(self.task in TASKS, "task", f"must be one of {list(TASKS)}, got {self.task!r}")
        task, names = TASKS[self.task], self.class_names
        baseline = self.reference_masks is None or task.human_baseline
        need(baseline, "reference_masks", "a human baseline is scored for a binary task only")
        modes = list(MASK_ENCODINGS)
        need(self.mask_encoding in modes, "mask_encoding", f"must be one of {modes}, got {self.mask_encoding!r}")
        need(len(names) == len(set(names)), "classes", f"has duplicate names: {names}")
        need(2 <= len(names) <= 255, "classes", f"needs 2 to 255 classes, got {len(names)}")
        counted = task.classes is None or len(names) == task.classes
        need(counted, "classes", f"a {self.task} task has {task.classes} classes (background first), got {names}")
        named = task.default_classes is not None or self.classes is not None
        need(named, "classes", "a multiclass task needs its class names, background first")
        if self.mask_encoding == "rgb":
            need(self.colors_given, "classes", "rgb masks need a color for every class ({name, color})")
            colors = [tuple(c) for c in self.class_colors]
            need(len(set(colors)) == len(colors), "classes", "two classes have the same color")
        ignore = self.ignore_value
        index_value = ignore is None or (self.mask_encoding == "index" and 0 <= ignore <= 65535)
        need(index_value, "ignore_value", "applies to index masks only, a value in 0-65535")
        need(
            ignore is None or ignore >= len(names),
            "ignore_value",
            f"{ignore} is a class index (classes 0-{len(names) - 1})",
        )
        need(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        need(0 < self.scale <= 16, "scale", f"must be in (0, 16], got {self.scale}")

    @property
    def class_names(self) -> list[str]:
        if self.classes is None:
            return list(BINARY_CLASSES)
        return [c if isinstance(c, str) else c.name for c in self.classes]

    @property
    def colors_given(self) -> bool:
        return self.classes is not None and all(isinstance(c, ClassParams) and c.color for c in self.classes)

    @property
    def class_colors(self) -> list[list[int]]:
        """One overlay colour per class: the given ones, else the default palette's (cycled)."""
        given = [None if isinstance(c, str) else c.color for c in (self.classes or BINARY_CLASSES)]
        return [list(color) if color else DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i, color in enumerate(given)]


def _gray_levels(pixels: np.ndarray, palette: list[int] | None, name: str) -> np.ndarray:
    """(H, W) values of a mask meant to be gray: a palette's colours looked up, equal RGB channels merged."""
    if palette is not None:
        pixels = look_up(pixels, palette)
    if pixels.ndim == 3:
        if pixels.shape[2] in (2, 4):
            pixels = pixels[..., :-1]
        if pixels.shape[2] == 3 and not ((pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])).all():
            raise ImageError(f"{name}: a colour mask; these masks are gray levels (mask_encoding rgb reads colours)")
        pixels = pixels[..., 0]
    return pixels


def decode_mask(
    source: bytes | BinaryIO | Path, name: str, params: PrepareParams
) -> tuple[np.ndarray, np.ndarray | None]:
    """(class indices uint8 (H, W), pixels to ignore bool (H, W) or None) of a mask file, by ``mask_encoding``."""
    pixels, palette = decode(source, name)
    num_classes = len(params.class_names)
    if params.mask_encoding == "rgb":
        return _rgb_classes(pixels, palette, name, params), None
    if params.mask_encoding == "index":
        if palette is None:
            pixels = _gray_levels(pixels, None, name)
        # On the pixels' own (8- or 16-bit) type: widening them to 64 bits is slow.
        ignored = None if params.ignore_value is None else pixels == params.ignore_value
        bad = pixels >= num_classes
        if ignored is not None:
            bad &= ~ignored
        if bad.any():
            raise ImageError(
                f"{name}: mask value {pixels[bad][0]} is not a class index (0-{num_classes - 1})"
                + ("" if params.ignore_value is None else f" nor ignore_value {params.ignore_value}")
            )
        return (pixels if ignored is None else np.where(ignored, 0, pixels)).astype(np.uint8), ignored
    values = _gray_levels(pixels, palette, name)
    bad = (values != 0) & (values != 1) & (values != 255) & (values != 65535)
    if bad.any():
        raise ImageError(
            f"{name}: mask value {values[bad][0]}; binary masks hold 0 (background) and 1 or 255 (foreground) only"
        )
    return (values != 0).astype(np.uint8), None


def _rgb_classes(pixels: np.ndarray, palette: list[int] | None, name: str, params: PrepareParams) -> np.ndarray:
    rgb = as_image(pixels, palette, 3, name).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    table = {(r << 16) | (g << 8) | b: i for i, (r, g, b) in enumerate(params.class_colors)}
    found, inverse = np.unique(codes, return_inverse=True)
    classes = np.empty(len(found), dtype=np.uint8)
    for i, code in enumerate(found.tolist()):
        if code not in table:
            colour = [code >> 16, (code >> 8) & 255, code & 255]
            raise ImageError(
                f"{name}: colour {colour} is no class's colour (classes: "
                + ", ".join(f"{n} {c}" for n, c in zip(params.class_names, params.class_colors))
                + ")"
            )
        classes[i] = table[code]
    return classes[inverse].reshape(codes.shape)


def _glob(text: str) -> str:
    """A regular expression of a pattern's text: ``*`` and ``?`` within one path segment, the rest literal."""
    return "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in text)


def match_files(names: list[str], pattern: str, key: str) -> dict[str, str]:
    """``{id: name}`` of the names that ``pattern`` matches; an id matched twice is an error naming both files."""
    head, tail = pattern.split("{id}")
    regex, found = re.compile(f"{_glob(head)}(?P<id>[^/]+?){_glob(tail)}"), {}
    for name in names:
        if m := regex.fullmatch(name):
            file_id = m["id"]
            if file_id in found:
                raise ImageError(
                    f"{key}: {pattern!r} matches two files for id {file_id!r}: {found[file_id]} and {name}"
                )
            if not ID_PATTERN.fullmatch(file_id):
                raise ImageError(
                    f"{name}: its id {file_id!r} (from {key}) is not a plain name "
                    "(letters, digits, '.', '_', '-'; at most 128)"
                )
            found[file_id] = name
    if not found:
        sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ImageError(f"{key}: no file matches {pattern!r} (files: {sample or 'none'})")
    return found


def pair_files(names: list[str], params: PrepareParams, key: str) -> dict[str, dict[str, str]]:
    """``{id: {"image": name, "mask": name, ...}}``; an image without a mask (or validity mask), or any mask without
    an image, is an error naming the file (reference masks: checked for the test split by ``plan``)."""
    others = {
        role: match_files(names, getattr(params, role), f"{key}.{role}") for role in PAIR_KEYS if getattr(params, role)
    }
    # A mask is not an image, though "{id}.png" matches "0001_mask.png" beside "0001.png" in one folder.
    claimed = {name for files in others.values() for name in files.values()}
    images = match_files([name for name in names if name not in claimed], params.images, f"{key}.images")
    for role, files in others.items():
        if role != "reference_masks" and (missing := sorted(set(images) - set(files))):
            raise ImageError(
                f"{images[missing[0]]}: no file matches {key}.{role} {getattr(params, role)!r} for "
                f"id {missing[0]!r}" + (f" (nor for {len(missing) - 1} other images)" if len(missing) > 1 else "")
            )
        if extra := sorted(set(files) - set(images)):
            raise ImageError(f"{files[extra[0]]}: no image matches {key}.images {params.images!r} for id {extra[0]!r}")
    return {
        i: {"image": images[i], **{PAIR_KEYS[role]: files[i] for role, files in others.items() if i in files}}
        for i in sorted(images)
    }


def split_ids(ids: list[str], params: SplitParams, tree, key: str) -> dict[str, list[str]]:
    """Each split's ids, sorted; an empty train or test split, an unknown id or an id in two splits is an error."""
    if params.method == "ratio":
        chosen = ratio_split(ids, params, key)
    else:
        if params.method == "ids":
            listed = {"train": params.train_ids, "val": params.val_ids, "test": params.test_ids}
            where = {name: f"params.yaml: {key}.split.{name}_ids" for name in SPLITS}
        else:
            listed, where = _read_split_file(params.file, tree, key), {name: params.file for name in SPLITS}
        known = set(ids)
        for name, members in listed.items():
            if members is not None and (unknown := sorted(set(members) - known)):
                raise ParamError(f"{where[name]}: id {unknown[0]!r} has no image (ids: {', '.join(ids[:5])}, ...)")
        seen: dict[str, str] = {}
        for name, members in listed.items():
            for member in members or []:
                if member in seen:
                    raise ParamError(f"{where[name]}: id {member!r} is in both {seen[member]} and {name}")
                seen[member] = name
        if listed["train"] is None:
            listed["train"] = [i for i in ids if i not in seen]
        chosen = {**listed, "val": listed["val"] or []}
    for name in ("train", "test"):  # an empty validation split: everything else trains, without a validation curve
        if not chosen[name]:
            raise ParamError(f"params.yaml: {key}.split: the {name} split is empty")
    return {name: sorted(chosen[name]) for name in SPLITS}


def ratio_split(ids: list[str], params: SplitParams, key: str) -> dict[str, list[str]]:
    """Each id's split from a hash of the seed and the id alone (so adding images moves no other): val below
    ``val``, test below ``val + test``; a split left empty takes the id whose draw is nearest to its range."""
    if len(ids) < (3 if params.val else 2):
        raise ParamError(f"params.yaml: {key}.split: {len(ids)} images cannot make train, val and test splits")
    draw = {i: int.from_bytes(hashlib.sha256(f"{params.seed}:{i}".encode()).digest()[:8], "big") / 2**64 for i in ids}
    val, test = params.val, params.val + params.test
    ranges = {"val": (0.0, val), "test": (val, test), "train": (test, 1.0)}
    chosen = {name: [i for i in ids if low <= draw[i] < high] for name, (low, high) in ranges.items()}
    for name in ("test", "val") if params.val else ("test",):
        if not chosen[name]:
            low, high = ranges[name]
            donors = [i for split, members in chosen.items() if split != name and len(members) > 1 for i in members]
            nearest = min(donors, key=lambda i: (min(abs(draw[i] - low), abs(draw[i] - high)), i))
            for members in chosen.values():
                if nearest in members:
                    members.remove(nearest)
            chosen[name].append(nearest)
    return chosen


def _read_split_file(name: str, tree, key: str) -> dict[str, list[str]]:
    if name not in tree.names:
        raise ParamError(f"params.yaml: {key}.split.file: {name!r} is not among the dataset's files")
    try:
        text = tree.read([name])[name].decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"{name}: not a UTF-8 text file of '<id> <split>' lines") from None
    listed: dict[str, list[str]] = {split: [] for split in SPLITS}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in SPLITS:
            raise ImageError(f"{name}:{number}: expected '<id> <split>' with split one of {list(SPLITS)}, got {line!r}")
        listed[fields[1]].append(fields[0])
    return listed


def decode_sample(source: Source, params: PrepareParams) -> Sample:
    """One id's files read and decoded, sizes checked, each scaled."""
    files = source.payload
    contents = _RAW["tree"].read(sorted(set(files.values())))
    image = read_image(contents[files["image"]], files["image"], params.channels)
    mask, ignored = decode_mask(contents[files["mask"]], files["mask"], params)
    valid = decode_valid(contents[files["valid"]], files["valid"]) if "valid" in files else None
    reference = None
    if "reference" in files:
        reference, unlabelled = decode_mask(contents[files["reference"]], files["reference"], params)
        if unlabelled is not None:  # a pixel either annotator leaves out is scored for neither model nor human
            ignored = unlabelled if ignored is None else ignored | unlabelled
    for role, array in (("mask", mask), ("valid", valid), ("reference", reference)):
        if array is not None and array.shape != image.shape[:2]:
            raise ImageError(
                f"{files[role]}: {array.shape[1]} x {array.shape[0]} pixels, but its image "
                f"{files['image']} has {image.shape[1]} x {image.shape[0]}"
            )
    if ignored is not None:
        valid = ~ignored if valid is None else valid & ~ignored
    sample = Sample(
        source.id,
        resize(image, params.scale, nearest=False),
        resize(mask, params.scale, nearest=True),
        None if valid is None else resize(valid, params.scale, nearest=True),
        None if reference is None else resize(reference, params.scale, nearest=True),
    )
    # A field of view for every sample where a validity mask or an ignored value can make one for any.
    if sample.fov is None and (params.valid is not None or params.ignore_value is not None):
        sample.fov = np.ones(sample.mask.shape, bool)
    return sample


def class_pixels(mask: np.ndarray, fov: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Pixels per class of a uint8 ``mask`` among those that count, by OpenCV's histogram (faster than bincount),
    whose float32 counts are exact below 2^24: rows are counted in parts of at most 2^23 pixels."""
    counts = np.zeros(256, np.int64)
    rows = max(1, 2**23 // mask.shape[1])
    for start in range(0, mask.shape[0], rows):
        part = np.ascontiguousarray(mask[start : start + rows])
        where = None if fov is None else np.ascontiguousarray(fov[start : start + rows]).view(np.uint8)
        counts += cv2.calcHist([part], [0], where, [256], [0, 256]).ravel().astype(np.int64)
    return counts[:num_classes]


def tally(samples: list[Sample], num_classes: int) -> dict:
    """Pixels per class (of the ground truth and the reference masks) among the pixels that count."""
    counts = {"pixels": np.zeros(num_classes, np.int64), "reference_pixels": np.zeros(num_classes, np.int64)}
    for sample in samples:
        counts["pixels"] += class_pixels(sample.mask, sample.fov, num_classes)
        if sample.reference is not None:
            counts["reference_pixels"] += class_pixels(sample.reference, sample.fov, num_classes)
    return counts


# The raw tree and pairing of the plan being prepared, shared with the forked decoding workers.
_RAW: dict[str, object] = {}


def source_digest(image_id: str) -> str:
    """sha256 of the files of ``image_id`` (of the plan being prepared), names and sizes included."""
    digest = hashlib.sha256()
    for name, content in sorted(_RAW["tree"].read(sorted(set(_RAW["used"][image_id].values()))).items()):
        digest.update(f"{name}\0{len(content)}\0".encode())
        digest.update(content)
    return digest.hexdigest()


def plan(raw_dir: Path, params: PrepareParams) -> Plan:
    """The samples of the folder dataset in ``raw_dir`` (``data/raw/<name>``: its name is the dataset's)."""
    name = raw_dir.name
    key = f"{name}.prepare"
    tree = archives.RawTree(raw_dir)
    pairs = pair_files(tree.names, params, key)
    chosen = split_ids(list(pairs), params.split, tree, key)
    # Ids a split leaves out are never read, nor reference masks outside the test split (they are not scored).
    used = {
        i: {role: file for role, file in pairs[i].items() if role != "reference" or split == "test"}
        for split, ids in chosen.items()
        for i in ids
    }
    if params.reference_masks and (missing := [i for i in chosen["test"] if "reference" not in used[i]]):
        raise ImageError(
            f"{used[missing[0]]['image']}: no file matches {key}.reference_masks "
            f"{params.reference_masks!r} for test id {missing[0]!r}"
            + (f" (nor for {len(missing) - 1} other test images)" if len(missing) > 1 else "")
        )
    _RAW.update(tree=tree, used=used)
    ids = [i for members in chosen.values() for i in members]  # each named by its files' bytes, hashed on every core
    work = in_order(lambda task, slot: [source_digest(i) for i in task], chunks(ids, 4), decoding_processes())
    digests = dict(zip(ids, (digest for chunk in work for digest in chunk)))

    def summary(tallies: dict[str, dict], written: dict[str, PreparedSplit]) -> dict:
        sizes = {size for split in written.values() for size in split.sizes}
        out = {
            "image_size": [max(h for h, _ in sizes), max(w for _, w in sizes)],
            "image_sizes": len(sizes),
            "unused_ids": len(pairs) - len(ids),
        }
        for name, split in written.items():
            counts = {**tally([], len(params.class_names)), **tallies[name]}
            keys = ("pixels", "reference_pixels") if split.has_reference else ("pixels",)
            out[name] = {"images": len(split)} | {
                f"{key}_per_class": dict(zip(params.class_names, counts[key].tolist())) for key in keys
            }
        return out

    meta = DatasetMeta(
        name=name, task=params.task, classes=params.class_names, colors=params.class_colors, scale=params.scale
    )
    return Plan(
        meta,
        {split: [Source(i, digests[i], used[i]) for i in ids] for split, ids in chosen.items()},
        functools.partial(each, functools.partial(decode_sample, params=params)),
        functools.partial(tally, num_classes=len(params.class_names)),
        summary,
    )
