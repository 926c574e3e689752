"""Training augmentation (``<ds>.train.augment``, ``patch_size``, ``patch_sampling``) as one albumentations pipeline:
in a fixed order, each if asked for, a crop to a patch, flips, quarter turns, an affine warp, brightness/contrast,
gamma, a colour-balance shift, blur and JPEG compression (the last three: what another camera changes). Masks are
resampled with nearest neighbours; pixels a crop or warp brings in get ``fill_mask``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# albumentations checks PyPI for a newer release when imported: a stage must not reach for the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from pipeline.losses import IGNORE  # noqa: E402
from pipeline.params import require  # noqa: E402

INTERPOLATION = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
# No OpenCV thread pool: the cores belong to torch, and a pool forked into the augmenting worker can hang there.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class AffineParams:
    """albumentations ``Affine``; the defaults are the tutorial's."""

    p: float = 1.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_px: int = 2
    rotate: float = 10.0
    shear: float = 15.0
    # How the image is resampled: "nearest" keeps a mask that is a threshold of the image (MNIST) consistent.
    interpolation: str = "linear"

    def validate(self, key: str) -> None:
        require(0 <= self.p <= 1, f"{key}.p", f"must be in [0, 1], got {self.p}")
        message = f"must be 'linear' or 'nearest', got {self.interpolation!r}"
        require(self.interpolation in INTERPOLATION, f"{key}.interpolation", message)
        ok = len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1]
        require(ok, f"{key}.scale", f"must be [low, high] with 0 < low <= high, got {list(self.scale)}")
        for name in ("translate_px", "rotate", "shear"):
            require(getattr(self, name) >= 0, f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class AugmentParams:
    affine: AffineParams | None = None  # None: no geometric warp
    flips: bool = False  # random horizontal and vertical flips
    rotate90: bool = False  # random multiples of 90 degrees
    brightness_contrast: float = 0.0  # max relative change of brightness and of contrast; 0 disables
    gamma: float = 0.0  # max relative change of gamma; 0 disables
    colour_balance: float = 0.0  # max relative change of each channel's gain; 0 disables
    blur: float = 0.0  # max sigma of a Gaussian blur, in pixels (from 0.5 up); 0 disables
    jpeg_quality: int | None = None  # lowest JPEG quality an image is compressed at (up to 95); None disables

    def validate(self, key: str) -> None:
        for name in ("brightness_contrast", "gamma", "colour_balance"):
            value = getattr(self, name)
            require(0 <= value < 1, f"{key}.{name}", f"must be in [0, 1), got {value}")
        require(0 <= self.blur <= 5, f"{key}.blur", f"must be in [0, 5], got {self.blur}")
        quality = self.jpeg_quality
        require(quality is None or 1 <= quality <= 95, f"{key}.jpeg_quality", f"must be in [1, 95], got {quality}")


def build_augmentation(
    aug: AugmentParams, patch_size: int | None, seed: int, fill_mask: int, patch_sampling: str = "uniform"
) -> A.Compose:
    """``fill_mask`` labels pixels that a crop or warp brings in from outside the image."""
    transforms = []
    if patch_size is not None and patch_sampling == "foreground":
        # Padded first: the crop refuses an image smaller than itself. IGNORE is never a foreground.
        pad = A.PadIfNeeded(patch_size, patch_size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=fill_mask, p=1.0)
        transforms += [pad, A.CropNonEmptyMaskIfExists(patch_size, patch_size, ignore_values=[IGNORE], p=1.0)]
    elif patch_size is not None:
        transforms.append(A.RandomCrop(patch_size, patch_size, pad_if_needed=True, fill_mask=fill_mask, p=1.0))
    if aug.flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if aug.rotate90:
        transforms.append(A.RandomRotate90(p=0.5))
    if (affine := aug.affine) is not None:
        transforms.append(
            A.Affine(
                scale=tuple(affine.scale),
                translate_px=(-affine.translate_px, affine.translate_px),
                rotate=(-affine.rotate, affine.rotate),
                shear=(-affine.shear, affine.shear),
                interpolation=INTERPOLATION[affine.interpolation],
                fill_mask=fill_mask,
                p=affine.p,
            )
        )
    if aug.brightness_contrast > 0:
        transforms.append(A.RandomBrightnessContrast(aug.brightness_contrast, aug.brightness_contrast, p=0.5))
    if aug.gamma > 0:
        transforms.append(A.RandomGamma((100 * (1 - aug.gamma), 100 * (1 + aug.gamma)), p=0.5))
    if aug.colour_balance > 0:
        gains = (1 - aug.colour_balance, 1 + aug.colour_balance)
        transforms.append(A.MultiplicativeNoise(gains, per_channel=True, elementwise=False, p=0.5))
    if aug.blur > 0:
        transforms.append(A.GaussianBlur(sigma_limit=(min(0.5, aug.blur), aug.blur), p=0.5))
    if aug.jpeg_quality is not None:
        transforms.append(A.ImageCompression(quality_range=(aug.jpeg_quality, 95), p=0.5))
    return A.Compose(transforms, seed=seed)
