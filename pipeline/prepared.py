"""The prepared format: the single contract between ``prepare`` and the dataset-agnostic stages.

::

    data/prepared/<dataset>/
        meta.json     {"name", "task": "multiclass" | "binary", "classes": [...], "colors": [[r, g, b], ...]}
        train.npz     images uint8 (N, H, W, C), masks uint8 (N, H, W) of class indices,
        val.npz       ids (N,) str, and optionally fov bool (N, H, W) -- the pixels that count --
        test.npz      and reference_masks uint8 (N, H, W) -- a second annotator, a human baseline.

Uncompressed ``.npz``: one file per split keeps ``dvc push`` fast, and loading 60,000 MNIST images takes
a few hundredths of a second. Every split is checked when it is loaded, so a tampered or truncated file
(pulled from a shared remote, say) is refused with its name rather than trusted: before numpy reads a byte of
an array, each member must be an uncompressed ``.npy`` of a known name whose header declares exactly the bytes
it holds (:func:`check_zip`, which torch files pass through too), so loading allocates no more than the file
holds; after, shapes, dtypes, class indices and ids. A train or test split holds at least one image, and a
split with a field of view at least one valid pixel.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.atomic import atomic_path
from pipeline.stage import StageError

SPLITS = ("train", "val", "test")
TASKS = ("multiclass", "binary")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# Loaders' advice to load a refused file unsafely (torch's weights_only=False or allowlist, numpy's allow_pickle):
# never repeated to a user whose file may be hostile.
UNSAFE_ADVICE = re.compile(r"weights_only|allow_pickle|safe_globals|allowlist|trust", re.IGNORECASE)


class PreparedDataError(StageError):
    """A prepared dataset is missing, malformed or inconsistent."""


def error_reason(error: BaseException) -> str:
    """One line of why a loader refused a file: the first sentence of the innermost error in the chain that is
    not advice to load the file unsafely. (torch wraps its unpickler's refusal, ``raise ... from None``, in a page
    of such advice whose wording changes between versions; the refusal itself is the wrapped error.)"""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    for sentence in re.split(r"(?<=\.)\s+|\n", str(error)):
        if sentence.strip() and not UNSAFE_ADVICE.search(sentence):
            return sentence.strip()
    return type(error).__name__


def check_zip(path: str | os.PathLike, limits: Iterable[tuple[str, float]], kind: str,
              error: type[StageError] = PreparedDataError) -> list[zipfile.ZipInfo]:
    """The members of the zip archive at ``path`` (an ``.npz``, a torch file), checked before any is read.

    Each member's name must match one of ``limits``' patterns, whose number is the most bytes it may hold; it
    must be stored uncompressed (numpy and torch write these files so), and lie within the file. What a reader
    of the members then allocates is bounded by the file's own size, not by what its headers claim. A missing
    file raises FileNotFoundError, for the caller to report; anything else wrong is ``error``, naming the file.
    """
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:  # reads the central directory, which lies within the file
            members = archive.infolist()
    except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile) as e:
        raise error(f"{path}: not a {kind} ({error_reason(e)})") from None
    patterns = [(re.compile(pattern), most) for pattern, most in limits]
    if len({m.filename for m in members}) != len(members):
        raise error(f"{path}: two members have the same name")
    for member in members:
        name = member.filename
        most = next((most for pattern, most in patterns if pattern.fullmatch(name)), None)
        if most is None:
            raise error(f"{path}: unexpected member {name} in a {kind}")
        if member.compress_type != zipfile.ZIP_STORED:
            raise error(f"{path}: member {name} is compressed; this file holds uncompressed members only")
        if member.file_size != member.compress_size or member.header_offset + member.file_size > size:
            raise error(f"{path}: member {name} declares {member.file_size:,} bytes; the file holds {size:,}")
        if member.file_size > most:
            raise error(f"{path}: member {name} holds {member.file_size:,} bytes; at most {most:,} in a {kind}")
    return members


def check_npy_members(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Each ``.npy`` member's header declares exactly the bytes the member holds, and no Python objects: numpy
    allocates an array by its header before reading it (730 GiB for a header of a few bytes)."""
    with zipfile.ZipFile(path) as archive:
        for info in members:
            with archive.open(info) as member:
                try:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):  # what np.savez writes for names and dtypes of these arrays
                        raise ValueError(f"npy format version {version} is not read here")
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                except ValueError as e:
                    raise PreparedDataError(f"{path}: member {info.filename} is not a numpy array "
                                            f"({error_reason(e)})") from None
                if dtype.hasobject:
                    raise PreparedDataError(f"{path}: member {info.filename} holds Python objects (dtype {dtype}); "
                                            "the prepared format holds plain arrays only")
                declared, held = math.prod(shape) * dtype.itemsize, info.file_size - member.tell()
                if declared != held:
                    raise PreparedDataError(f"{path}: member {info.filename} declares {declared:,} bytes of {dtype} "
                                            f"{shape} but holds {held:,}")


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    masks: np.ndarray  # uint8 (N, H, W), class indices
    ids: np.ndarray  # str (N,)
    fov: np.ndarray | None = None  # bool (N, H, W): pixels inside the field of view, the only ones scored
    reference_masks: np.ndarray | None = None  # uint8 (N, H, W): a second annotator's masks

    def __len__(self) -> int:
        return len(self.images)

    def check(self, where: str, num_classes: int) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise PreparedDataError(f"{where}: images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        for name in ("masks", "fov", "reference_masks"):
            array = getattr(self, name)
            if array is not None and array.shape != self.images.shape[:3]:
                raise PreparedDataError(f"{where}: {name} shape {array.shape} does not match images {self.images.shape[:3]}")
        for name in ("masks", "reference_masks"):
            array = getattr(self, name)
            if array is not None and (array.dtype != np.uint8 or (array.size and array.max() >= num_classes)):
                raise PreparedDataError(f"{where}: {name} must be uint8 class indices below {num_classes}")
        if self.fov is not None and self.fov.dtype != np.bool_:
            raise PreparedDataError(f"{where}: fov must be bool, got {self.fov.dtype}")
        if self.fov is not None and n and not self.fov.any():  # evaluate would have no pixel to score
            raise PreparedDataError(f"{where}: no pixel of its {n} images is valid (its fov is all false); "
                                    "nothing to train on or score")
        if len(self.ids) != n:
            raise PreparedDataError(f"{where}: {len(self.ids)} ids for {n} images")
        # Render names a file after each id: an id must not be able to name a path.
        bad = [str(i) for i in self.ids if not ID_PATTERN.fullmatch(str(i))]
        if bad:
            raise PreparedDataError(f"{where}: id {bad[0]!r} is not a plain name (letters, digits, '.', '_', '-')")
        if len(set(self.ids.tolist())) != n:
            raise PreparedDataError(f"{where}: ids are not unique")


@dataclass
class DatasetMeta:
    name: str
    task: str  # "multiclass": softmax over len(classes); "binary": one logit, class 1 is positive
    classes: list[str]
    colors: list[list[int]]  # RGB 0-255, one per class, for overlays

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def model_outputs(self) -> int:
        return 1 if self.task == "binary" else self.num_classes

    def check(self, where: str) -> None:
        if not isinstance(self.classes, list) or not all(isinstance(c, str) for c in self.classes):
            raise PreparedDataError(f"{where}: classes must be a list of names, got {self.classes!r:.60}")
        if not isinstance(self.colors, list) or not all(
                isinstance(c, list) and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in self.colors):
            raise PreparedDataError(f"{where}: colors must be a list of [r, g, b] in 0-255, got {self.colors!r:.60}")
        if self.task not in TASKS:
            raise PreparedDataError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if len(self.colors) != len(self.classes) or any(len(c) != 3 for c in self.colors):
            raise PreparedDataError(f"{where}: need one RGB colour per class")
        if self.task == "binary" and len(self.classes) != 2:
            raise PreparedDataError(f"{where}: a binary task has exactly 2 classes, got {self.classes}")


def save_prepared(directory: str | os.PathLike, meta: DatasetMeta, splits: dict[str, Split]) -> None:
    """Write the whole prepared dataset at once: it appears complete, or not at all."""
    meta.check(str(directory))
    if set(splits) != set(SPLITS):
        raise PreparedDataError(f"need splits {SPLITS}, got {sorted(splits)}")
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps(vars(meta), indent=2) + "\n")
        for name, split in splits.items():
            split.check(f"{directory}/{name}", meta.num_classes)
            _check_not_empty(split, name, f"{directory}/{name}")
            arrays = {k: v for k, v in vars(split).items() if v is not None}
            arrays["ids"] = np.asarray(arrays["ids"], dtype=str)
            np.savez(tmp / f"{name}.npz", **arrays)


def load_meta(directory: str | os.PathLike) -> DatasetMeta:
    path = Path(directory) / "meta.json"
    try:
        meta = DatasetMeta(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise PreparedDataError(f"{path}: not found; run the prepare stage first") from None
    except (OSError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreparedDataError(f"{path}: not a valid dataset description: {e}") from None
    meta.check(str(path))
    return meta


def _check_not_empty(split: Split, name: str, where: str) -> None:
    # An empty validation split is allowed (STARE trains on all its images); nothing trains or scores on none.
    if name != "val" and not len(split):
        raise PreparedDataError(f"{where}: holds no images; the {name} split needs at least one")


def load_split(directory: str | os.PathLike, name: str) -> Split:
    """One split, checked against ``meta.json`` (shapes, dtypes, class indices, ids) before any stage uses it."""
    meta = load_meta(directory)
    path = Path(directory) / f"{name}.npz"
    if not path.exists():
        raise PreparedDataError(f"{path}: not found; run the prepare stage first")
    names = "|".join(field.name for field in fields(Split))
    check_npy_members(path, check_zip(path, [(rf"({names})\.npy", math.inf)], "prepared split"))
    try:
        # allow_pickle=False: ids are stored as a fixed-width unicode array, so nothing here needs unpickling.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        split = Split(**arrays)
    except (OSError, ValueError, zipfile.BadZipFile) as e:  # a corrupt member
        raise PreparedDataError(f"{path}: not a readable prepared split: {error_reason(e)}") from None
    except TypeError as e:
        raise PreparedDataError(f"{path}: unexpected arrays {sorted(arrays)}: {e}") from None
    split.check(str(path), meta.num_classes)
    _check_not_empty(split, name, str(path))
    return split
