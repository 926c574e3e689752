"""Every parameter the stages read is parsed and validated here, and only here.

``params.yaml`` is grouped by dataset, then by stage (``mnist.train.epochs``), so that DVC can give each
stage exactly the keys it reads (``params: [mnist.train]``) and ``dvc exp run -S mnist.train.epochs=20``
reads naturally. A bad value stops the stage with an error that names the key and says what is wrong.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ParamError(f"{key}: {message}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        if value is None and len(options) < len(typing.get_args(annotation)):
            return None
        if len(options) == 1:  # "X | None": report X's own, more precise error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ParamError:
                pass
        _fail(key, f"expected {annotation}, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return _parse_section(annotation, value, key)
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}")
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, f"expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug here, not in params.yaml


def _parse_section(cls: type, raw: Any, key: str):
    if not isinstance(raw, dict):
        _fail(key, f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        _fail(f"{key}.{unknown[0]}", f"unknown parameter (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{key}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(f"{key}.{name}", "missing")
    section = cls(**values)
    section.validate(key)
    return section


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        _fail(key, message)


# ---------------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class DownloadParams:
    base_urls: list[str]
    timeout_s: float = 60.0
    retries: int = 3

    def validate(self, key: str) -> None:
        _require(self.timeout_s > 0, f"{key}.timeout_s", f"must be > 0, got {self.timeout_s}")
        _require(self.retries >= 1, f"{key}.retries", f"must be >= 1, got {self.retries}")


@dataclass(frozen=True)
class MnistPrepareParams:
    threshold: float = 0.2
    val_size: int = 10_000
    train_size: int | None = None  # None: every training image not held out for validation
    test_size: int | None = None  # None: the whole official test set
    seed: int = 0

    def validate(self, key: str) -> None:
        _require(0 <= self.threshold < 1, f"{key}.threshold", f"must be in [0, 1), got {self.threshold}")
        _require(self.val_size >= 1, f"{key}.val_size", f"must be >= 1, got {self.val_size}")
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{key}.{name}", f"must be >= 1 or null, got {value}")


STARE_ANNOTATORS = ("ah", "vk")  # Hoover's two observers: Adam Hoover, Valentina Kouznetsova


@dataclass(frozen=True)
class StarePrepareParams:
    annotator: str = "ah"  # whose masks are the ground truth; the other's become reference_masks
    split: str = "standard"  # the usual 10 train / 10 test images, or "loo:<id>": test on that image alone
    # Held out of train for per-epoch monitoring: one normal and one pathological fundus, so the curve
    # reflects both kinds of image; the standard split keeps 8 images to train on.
    val_ids: list[str] = field(default_factory=lambda: ["im0082", "im0139"])
    image_size: tuple[int, int] = (605, 700)  # [height, width] every image and mask must have
    fov_threshold: float = 45.0  # smoothed red channel, 0-255, that finds the bright fundus (40-55 all agree)
    fov_smoothing: float = 2.0  # Gaussian sigma in pixels, so sensor noise cannot fray the disc edge
    fov_erosion: int = 1  # pixels trimmed off the disc edge: the half-dark step into the frame

    def validate(self, key: str) -> None:
        _require(self.annotator in STARE_ANNOTATORS, f"{key}.annotator",
                 f"must be one of {list(STARE_ANNOTATORS)}, got {self.annotator!r}")
        _require(self.split == "standard" or (self.split.startswith("loo:") and len(self.split) > 4), f"{key}.split",
                 f"must be 'standard' or 'loo:<image id>', got {self.split!r}")
        _require(len(set(self.val_ids)) == len(self.val_ids), f"{key}.val_ids", f"has duplicates: {self.val_ids}")
        _require(len(self.image_size) == 2 and min(self.image_size) >= 1, f"{key}.image_size",
                 f"must be [height, width] with both >= 1, got {list(self.image_size)}")
        _require(0 < self.fov_threshold < 255, f"{key}.fov_threshold", f"must be in (0, 255), got {self.fov_threshold}")
        _require(self.fov_smoothing >= 0, f"{key}.fov_smoothing", f"must be >= 0, got {self.fov_smoothing}")
        _require(self.fov_erosion >= 0, f"{key}.fov_erosion", f"must be >= 0, got {self.fov_erosion}")


@dataclass(frozen=True)
class AffineParams:
    """albumentations ``Affine``; the defaults are the tutorial's."""

    p: float = 1.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_px: int = 2
    rotate: float = 10.0
    shear: float = 15.0
    # How the image is resampled ("linear", albumentations' default, or "nearest"); masks always use nearest.
    # Where the mask is a pointwise function of the image (MNIST's threshold), nearest keeps the warped
    # image and mask consistent, while linear blurs edge pixels across the threshold under unchanged labels.
    interpolation: str = "linear"

    def validate(self, key: str) -> None:
        _require(0 <= self.p <= 1, f"{key}.p", f"must be in [0, 1], got {self.p}")
        _require(self.interpolation in ("linear", "nearest"), f"{key}.interpolation",
                 f"must be 'linear' or 'nearest', got {self.interpolation!r}")
        _require(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], f"{key}.scale",
                 f"must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        for name in ("translate_px", "rotate", "shear"):
            _require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class AugmentParams:
    affine: AffineParams | None = None  # None: no geometric warp
    flips: bool = False  # random horizontal and vertical flips
    rotate90: bool = False  # random multiples of 90 degrees
    brightness_contrast: float = 0.0  # max relative change of brightness and of contrast; 0 disables
    gamma: float = 0.0  # max relative change of gamma; 0 disables

    def validate(self, key: str) -> None:
        for name in ("brightness_contrast", "gamma"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"{key}.{name}", f"must be in [0, 1), got {value}")


LOSSES = ("cross_entropy", "bce", "dice", "bce_dice")
SCHEDULES = ("constant", "onecycle")


@dataclass(frozen=True)
class TrainParams:
    arch: str
    width: int
    epochs: int
    batch_size: int
    lr: float
    loss: str = "cross_entropy"
    schedule: str = "constant"  # "onecycle": warm-up then cosine decay to lr/1e4, stepped every batch
    weight_decay: float = 0.0
    patch_size: int | None = None  # None: whole images; else random square crops of this size
    samples_per_epoch: int | None = None  # None: one pass over the training images
    augment: AugmentParams = field(default_factory=AugmentParams)
    seed: int = 0

    def validate(self, key: str) -> None:
        from pipeline.models import ARCHITECTURES  # models imports torch: only pay for it when validating train

        _require(self.arch in ARCHITECTURES, f"{key}.arch", f"must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        _require(self.width >= 1, f"{key}.width", f"must be >= 1, got {self.width}")
        _require(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.loss in LOSSES, f"{key}.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        _require(self.schedule in SCHEDULES, f"{key}.schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        _require(self.patch_size is None or (self.patch_size >= 16 and self.patch_size % 16 == 0),
                 f"{key}.patch_size", f"must be a multiple of 16 (>= 16) or null, got {self.patch_size}")
        _require(self.samples_per_epoch is None or self.samples_per_epoch >= 1, f"{key}.samples_per_epoch",
                 f"must be >= 1 or null, got {self.samples_per_epoch}")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256

    def validate(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class RenderParams:
    grid: int = 10  # a grid x grid mosaic of test images
    alpha: float = 0.5  # opacity of the predicted mask over the image
    scale: int = 4  # each image pixel becomes scale x scale screen pixels
    batch_size: int = 16  # images per forward pass

    def validate(self, key: str) -> None:
        _require(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(1 <= self.grid <= 32, f"{key}.grid", f"must be in [1, 32], got {self.grid}")
        _require(0 <= self.alpha <= 1, f"{key}.alpha", f"must be in [0, 1], got {self.alpha}")
        _require(1 <= self.scale <= 16, f"{key}.scale", f"must be in [1, 16], got {self.scale}")


PREPARE_PARAMS: dict[str, type] = {"mnist": MnistPrepareParams, "stare": StarePrepareParams}
STAGE_PARAMS: dict[str, type] = {
    "download": DownloadParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "render": RenderParams,
}


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamError(f"{path}: not found (run the stages from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: expected a mapping at the top level")
    return raw


def load(dataset: str, stage: str, path: Path = PARAMS_FILE):
    """Parse and validate ``<dataset>.<stage>`` from params.yaml."""
    raw = read_params_file(path)
    if dataset not in raw:
        known = [k for k, v in raw.items() if isinstance(v, dict)]
        raise ParamError(f"{path}: no section for dataset {dataset!r} (sections: {known})")
    cls = PREPARE_PARAMS.get(dataset) if stage == "prepare" else STAGE_PARAMS.get(stage)
    if cls is None:
        raise ParamError(f"{path}: no parameters are defined for stage {stage!r} of dataset {dataset!r}")
    try:
        return _parse_section(cls, raw[dataset].get(stage, {}), f"{dataset}.{stage}")
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
