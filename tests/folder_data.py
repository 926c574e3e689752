"""Small image-folder datasets made in the test, in the layouts a user brings: what the ``folder`` kind reads.

* :func:`write_binary_folder`: ``images/<id>.jpg`` (RGB), ``masks/<id>_mask.png`` (0 / 255) and
  ``valid/<id>.gif`` (a disc, like a fundus camera's field of view), bright strokes on a dark textured
  background, so that a tiny network learns them in a few steps.
* :func:`write_rgb_zip`: ``scenes.zip`` with ``photos/<id>.png`` and ``labels/<id>.png``, masks coloured by an
  RGB table (black background, a red disc, a blue square), and ``split.txt``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

RGB_CLASSES = [
    {"name": "background", "color": [0, 0, 0]},
    {"name": "disc", "color": [220, 20, 60]},
    {"name": "square", "color": [0, 0, 142]},
]


def png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


def encode(array: np.ndarray, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def strokes(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): a few random straight strokes, 2 pixels wide."""
    h, w = size
    mask = np.zeros(size, bool)
    for _ in range(4):
        (y0, y1), (x0, x1) = rng.integers(0, h, 2), rng.integers(0, w, 2)
        for t in np.linspace(0, 1, 2 * (h + w)):
            y, x = int(round(y0 + t * (y1 - y0))), int(round(x0 + t * (x1 - x0)))
            mask[y : y + 2, x : x + 2] = True
    return mask


def disc(size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 2 - 1) ** 2


def binary_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RGB image, foreground bool, valid bool): strokes brighter than the background, dark outside the disc."""
    foreground, valid = strokes(rng, size), disc(size)
    image = rng.integers(30, 90, (*size, 3)).astype(np.uint8)
    image[foreground] = rng.integers(170, 230, (int(foreground.sum()), 3))
    image[~valid] = 0
    return image, foreground & valid, valid


def write_binary_folder(root: Path, n: int = 12, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "valid"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, foreground, valid = binary_sample(rng, size)
        (root / f"images/{i:03d}.jpg").write_bytes(encode(image, "JPEG", quality=95))
        (root / f"masks/{i:03d}_mask.png").write_bytes(png(foreground.astype(np.uint8) * 255))
        (root / f"valid/{i:03d}.gif").write_bytes(encode(valid.astype(np.uint8) * 255, "GIF"))
    return root


def rgb_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, RGB mask): a reddish disc and a bluish square on grey noise, coloured by RGB_CLASSES."""
    h, w = size
    classes = np.zeros(size, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(4, 8)
    classes[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    sy, sx, s = rng.integers(0, h - 12), rng.integers(0, w - 12), rng.integers(7, 12)
    classes[sy : sy + s, sx : sx + s] = 2
    image = rng.integers(90, 150, (*size, 3)).astype(np.uint8)
    image[classes == 1] = [230, 60, 60]
    image[classes == 2] = [50, 60, 230]
    colors = np.array([c["color"] for c in RGB_CLASSES], np.uint8)
    return image, colors[classes]


def write_rgb_zip(path: Path, n: int = 12, size: tuple[int, int] = (32, 40), seed: int = 1) -> Path:
    """``scenes.zip``: photos, RGB-coded labels and ``split.txt`` (ids 0-7 train, 8-9 val, 10- test)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    split = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i in range(n):
            image, label = rgb_sample(rng, size)
            archive.writestr(f"photos/s{i:02d}.png", png(image))
            archive.writestr(f"labels/s{i:02d}.png", png(label))
            split.append(f"s{i:02d} {'train' if i < 8 else 'val' if i < 10 else 'test'}")
        archive.writestr("split.txt", "# id split\n" + "\n".join(split) + "\n")
    return path


# ------------------------------------------------------------------------------------------ a fundus dataset


def tiff(array: np.ndarray, compression: str | None) -> bytes:
    """TIFF bytes written by Pillow: ``compression`` None (uncompressed), "tiff_adobe_deflate" or "tiff_lzw"."""
    return encode(array, "TIFF", **({"compression": compression} if compression else {}))


def vessel_tree(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """float (H, W): the width in pixels of the vessel over each pixel (0 off the vessels). A few curvy
    vessels leave the optic disc, thinning as they go, and branch; like a fundus's, only smaller."""
    h, w = size
    width = np.zeros(size)
    yy, xx = np.mgrid[:h, :w]
    disc_y, disc_x = h * rng.uniform(0.4, 0.6), w * rng.choice([0.25, 0.75])
    stack = [(disc_y, disc_x, angle, 2.8) for angle in rng.uniform(0, 2 * np.pi, 5)]
    while stack:
        y, x, angle, thickness = stack.pop()
        for _ in range(int(rng.integers(15, 40))):
            angle += rng.normal(0, 0.25)
            y, x = y + 1.5 * np.sin(angle), x + 1.5 * np.cos(angle)
            if not (0 <= y < h and 0 <= x < w):
                break
            near = (yy - y) ** 2 + (xx - x) ** 2 <= (thickness / 2) ** 2
            width[near] = np.maximum(width[near], thickness)
            thickness = max(1.0, thickness * 0.985)
            if thickness > 1.3 and rng.random() < 0.04:
                stack.append((y, x, angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0), thickness * 0.75))
    return width


def fundus_sample(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(RGB image, first annotator's vessels, second annotator's vessels, field of view), the masks bool.
    Vessels are darker than the reddish fundus, thin ones fainter, under noise and uneven lighting; the
    second annotator misses some of the thinnest vessel pixels and draws others a pixel wider."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (min(h, w) / 2 - 2) ** 2
    width = vessel_tree(rng, size)
    vessels = (width > 0) & fov
    light = 1 - 0.35 * ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (min(h, w) / 2) ** 2 + rng.uniform(-0.1, 0.1)
    contrast = np.clip(0.12 + 0.1 * width, 0, 0.45)  # of a vessel pixel against the fundus
    image = np.array([190.0, 95.0, 45.0]) * (light * (1 - contrast * (width > 0)))[..., None]
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255)
    image[~fov] = rng.integers(0, 8, (int((~fov).sum()), 3))
    second = vessels & ~((width < 2.2) & (rng.random(size) < 0.5))
    second |= np.roll(vessels & (width > 2), 1, axis=1) & fov
    return image.astype(np.uint8), vessels, second, fov


def write_fundus_folder(
    root: Path,
    size: tuple[int, int] = (64, 60),
    train: range = range(21, 41),
    test: range = range(1, 21),
    compression: str | None = "tiff_lzw",
    seed: int = 0,
) -> Path:
    """A dataset laid out as DRIVE's: ``training/`` and ``test/``, each with ``images/<id>_<part>.tif`` (RGB
    TIFF, ``compression`` in training, uncompressed in test), ``1st_manual/<id>_manual1.gif`` and
    ``mask/<id>_<part>_mask.gif`` (the field of view); ``test/2nd_manual/<id>_manual2.gif`` (a second
    annotator, for the test images only). Ids are two digits: 21-40 train, 01-20 test."""
    rng = np.random.default_rng(seed)
    for part, ids in (("training", train), ("test", test)):
        for sub in ("images", "1st_manual", "mask") + (("2nd_manual",) if part == "test" else ()):
            (root / part / sub).mkdir(parents=True, exist_ok=True)
        for i in ids:
            image, first, second, fov = fundus_sample(rng, size)
            (root / f"{part}/images/{i:02d}_{part}.tif").write_bytes(
                tiff(image, compression if part == "training" else None)
            )
            (root / f"{part}/1st_manual/{i:02d}_manual1.gif").write_bytes(encode(first.astype(np.uint8) * 255, "GIF"))
            (root / f"{part}/mask/{i:02d}_{part}_mask.gif").write_bytes(encode(fov.astype(np.uint8) * 255, "GIF"))
            if part == "test":
                second_gif = encode(second.astype(np.uint8) * 255, "GIF")
                (root / f"test/2nd_manual/{i:02d}_manual2.gif").write_bytes(second_gif)
    return root
