"""What stages hand to each other, and how it is written so that a crash never leaves a half-made artifact.

Every output is first written under a temporary name in the same directory and then renamed into place
(``os.replace`` is atomic within one filesystem). An interrupted stage leaves at most a ``.tmp-*`` entry,
which DVC does not track, never a truncated file under the declared name.

The prepared format, the single contract between ``prepare`` and the dataset-agnostic stages::

    data/prepared/<dataset>/
        meta.json     {"name", "task": "multiclass" | "binary", "classes": [...], "colors": [[r, g, b], ...]}
        train.npz     images uint8 (N, H, W, C), masks uint8 (N, H, W) of class indices,
        val.npz       ids (N,) str, and optionally fov bool (N, H, W) -- the pixels that count --
        test.npz      and reference_masks uint8 (N, H, W) -- a second annotator, a human baseline.

Uncompressed ``.npz``: one file per split keeps ``dvc push`` fast, and loading 60,000 MNIST images takes
a few hundredths of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

SPLITS = ("train", "val", "test")
TASKS = ("multiclass", "binary")


# ------------------------------------------------------------------------------------------ atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for a file or a directory (the block creates whichever it needs at the yielded path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------ prepared format


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
            raise ValueError(f"{where}: images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        for name in ("masks", "fov", "reference_masks"):
            array = getattr(self, name)
            if array is not None and array.shape != self.images.shape[:3]:
                raise ValueError(f"{where}: {name} shape {array.shape} does not match images {self.images.shape[:3]}")
        for name in ("masks", "reference_masks"):
            array = getattr(self, name)
            if array is not None and (array.dtype != np.uint8 or (array.size and array.max() >= num_classes)):
                raise ValueError(f"{where}: {name} must be uint8 class indices below {num_classes}")
        if self.fov is not None and self.fov.dtype != np.bool_:
            raise ValueError(f"{where}: fov must be bool, got {self.fov.dtype}")
        if len(self.ids) != n:
            raise ValueError(f"{where}: {len(self.ids)} ids for {n} images")


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
        if self.task not in TASKS:
            raise ValueError(f"{where}: task must be one of {TASKS}, got {self.task!r}")
        if len(self.colors) != len(self.classes) or any(len(c) != 3 for c in self.colors):
            raise ValueError(f"{where}: need one RGB colour per class")
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"{where}: a binary task has exactly 2 classes, got {self.classes}")


def save_prepared(directory: str | os.PathLike, meta: DatasetMeta, splits: dict[str, Split]) -> None:
    """Write the whole prepared dataset at once: it appears complete, or not at all."""
    meta.check(str(directory))
    if set(splits) != set(SPLITS):
        raise ValueError(f"need splits {SPLITS}, got {sorted(splits)}")
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text(json.dumps(vars(meta), indent=2) + "\n")
        for name, split in splits.items():
            split.check(f"{directory}/{name}", meta.num_classes)
            arrays = {k: v for k, v in vars(split).items() if v is not None}
            arrays["ids"] = np.asarray(arrays["ids"], dtype=str)
            np.savez(tmp / f"{name}.npz", **arrays)


def load_meta(directory: str | os.PathLike) -> DatasetMeta:
    path = Path(directory) / "meta.json"
    try:
        meta = DatasetMeta(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the prepare stage first") from None
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid dataset description: {e}") from None
    meta.check(str(path))
    return meta


def load_split(directory: str | os.PathLike, name: str) -> Split:
    path = Path(directory) / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the prepare stage first")
    # allow_pickle=False: ids are stored as a fixed-width unicode array, so nothing here needs unpickling.
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    try:
        return Split(**arrays)
    except TypeError as e:
        raise ValueError(f"{path}: unexpected arrays {sorted(arrays)}: {e}") from None


# ------------------------------------------------------------------------------------------ model checkpoint


def save_checkpoint(path: str | os.PathLike, model_config: dict, state_dict: dict, meta: DatasetMeta) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save({"model": model_config, "state_dict": state_dict, "dataset": vars(meta)}, tmp)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild the trained network from a checkpoint; returns ``(model, meta)``. Never unpickles code."""
    import torch

    from pipeline.models import build_model

    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; run the train stage first") from None
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path}: not a readable model checkpoint: {e}") from None
    model = build_model(checkpoint["model"])
    model.load_state_dict(checkpoint["state_dict"])
    # Channels-last like the inputs (pipeline.inference.to_input): oneDNN convolutions run faster that way.
    model = model.to(device, memory_format=torch.channels_last).eval()
    return model, DatasetMeta(**checkpoint["dataset"])


# ------------------------------------------------------------------------------------------ where things live


@dataclass(frozen=True)
class DatasetPaths:
    """Where each stage reads and writes for one dataset; dvc.yaml declares the same paths."""

    dataset: str

    @property
    def raw(self) -> Path:  # download: the verified original files
        return Path("data/raw") / self.dataset

    @property
    def prepared(self) -> Path:  # prepare: the prepared format above
        return Path("data/prepared") / self.dataset

    @property
    def model(self) -> Path:  # train: the checkpoint
        return Path("data/models") / self.dataset / "model.pt"

    @property
    def metrics(self) -> Path:  # data.json, eval.json, training curves, pictures: small, tracked by git
        return Path("metrics") / self.dataset
