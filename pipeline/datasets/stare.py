"""STARE retinal vessels (Hoover et al., IEEE TMI 2000) as a binary task: class 1 is vessel.

The official archives are read in memory; ``annotator``'s masks are the ground truth, the other's the reference.
STARE ships no field of view: one is derived from each image. Method and checks: docs/datasets.md.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology
from skimage.measure import CircleModel, label, regionprops
from skimage.segmentation import find_boundaries

from pipeline.archives import ArchiveError, gunzip, read_tar_members
from pipeline.params import ParamError, require
from pipeline.plans import Plan, Source, each
from pipeline.prepared import DatasetMeta, PreparedSplit, Sample
from pipeline.stage import StageError

STARE_ANNOTATORS = ("ah", "vk")  # Hoover's two observers: Adam Hoover, Valentina Kouznetsova
VERSION = 1  # of what this kind decodes: bumped by any change to the samples it makes (pipeline.plans.recipe)


@dataclass(frozen=True)
class PrepareParams:
    annotator: str = "ah"  # whose masks are the ground truth; the other's become reference_masks
    split: str = "standard"  # the usual 10 train / 10 test images, or "loo:<id>": test on that image alone
    # Held out of train for a validation curve (docs/datasets.md); empty: train on all 10 training images.
    val_ids: list[str] = field(default_factory=list)
    image_size: tuple[int, int] = (605, 700)  # [height, width] every image and mask must have
    fov_threshold: float = 45.0  # smoothed red channel, 0-255, that finds the bright fundus (40-55 all agree)
    fov_smoothing: float = 2.0  # Gaussian sigma in pixels, so sensor noise cannot fray the disc edge
    fov_erosion: int = 1  # pixels trimmed off the disc edge: the half-dark step into the frame

    def validate(self, key: str) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            require(ok, f"{key}.{name}", message)

        annotators = list(STARE_ANNOTATORS)
        need(self.annotator in annotators, "annotator", f"must be one of {annotators}, got {self.annotator!r}")
        split_ok = self.split == "standard" or (self.split.startswith("loo:") and len(self.split) > 4)
        need(split_ok, "split", f"must be 'standard' or 'loo:<image id>', got {self.split!r}")
        need(len(set(self.val_ids)) == len(self.val_ids), "val_ids", f"has duplicates: {self.val_ids}")
        size, size_ok = list(self.image_size), len(self.image_size) == 2 and min(self.image_size) >= 1
        need(size_ok, "image_size", f"must be [height, width] with both >= 1, got {size}")
        need(0 < self.fov_threshold < 255, "fov_threshold", f"must be in (0, 255), got {self.fov_threshold}")
        need(self.fov_smoothing >= 0, "fov_smoothing", f"must be >= 0, got {self.fov_smoothing}")
        need(self.fov_erosion >= 0, "fov_erosion", f"must be >= 0, got {self.fov_erosion}")


IMAGES_ARCHIVE = "stare-images.tar"
LABELS_ARCHIVE = "labels-{}.tar"  # .format(annotator)
STANDARD_TRAIN = ["im0001", "im0002", "im0003", "im0004", "im0005", "im0044", "im0077", "im0081", "im0082", "im0139"]
STANDARD_TEST = ["im0162", "im0163", "im0235", "im0236", "im0239", "im0240", "im0255", "im0291", "im0319", "im0324"]
CLASSES = ["background", "vessel"]
COLORS = [[0, 0, 0], [255, 255, 255]]
PARAMS_KEY = "stare.prepare"  # where the parameters live in params.yaml, for error messages

_PNM_MAGIC = {b"P5": 1, b"P6": 3}  # binary greyscale, binary RGB: number of channels
_PNM_TOKEN = re.compile(rb"(?:\s|#[^\n]*\n)*(\S+)")  # skip whitespace and comments, then one header token


def parse_pnm(data: bytes, name: str, channels: int, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W[, 3]) of a binary PGM (P5) or PPM (P6) of ``size`` (height, width), maxval 255, bytes exact."""
    tokens, position = [], 0
    for _ in range(4):  # magic, width, height, maxval
        match = _PNM_TOKEN.match(data, position)
        if match is None:
            raise StageError(f"{name}: truncated PNM header")
        tokens.append(match.group(1))
        position = match.end()
    magic, *numbers = tokens
    expected_magic = next(m for m, c in _PNM_MAGIC.items() if c == channels)
    if magic != expected_magic:
        raise StageError(f"{name}: expected a {expected_magic.decode()} file, got magic {magic[:8]!r}")
    if not all(n.isdigit() for n in numbers):
        raise StageError(f"{name}: malformed PNM header {b' '.join(tokens)[:40]!r}")
    width, height, maxval = map(int, numbers)
    if maxval != 255:
        raise StageError(f"{name}: maxval {maxval}, expected 255 (8-bit samples)")
    if (height, width) != tuple(size):
        raise StageError(f"{name}: image is {height}x{width} (height x width), expected {size[0]}x{size[1]}")
    # Exactly one whitespace byte separates the header from the samples (which may start with a space).
    if position >= len(data) or not data[position : position + 1].isspace():
        raise StageError(f"{name}: no whitespace after the PNM header")
    payload = data[position + 1 :]
    expected = height * width * channels
    if len(payload) != expected:
        raise StageError(f"{name}: {len(payload)} bytes of samples, {width}x{height}x{channels} needs {expected}")
    image = np.frombuffer(payload, dtype=np.uint8).reshape(height, width, channels)
    return image[:, :, 0] if channels == 1 else image


def read_archive(path: Path, suffix: str) -> dict[str, bytes]:
    """Decompressed members ``<id><suffix>`` of a tar as ``{id: bytes}``; any other member is an error."""
    if not path.is_file():
        raise StageError(f"{path}: not found; run the download stage first")
    members = {}
    for name, data in read_tar_members(path).items():
        match = re.fullmatch(r"(im\d{4})" + re.escape(suffix), name)
        if match is None:
            raise ArchiveError(f"{path.name}: unexpected member {name!r} (expected imNNNN{suffix})")
        members[match.group(1)] = gunzip(data, f"{path.name}:{name}")
    return members


def load_raw(raw_dir: Path) -> tuple[list[str], dict[str, bytes], dict[str, dict[str, bytes]]]:
    """``(ids, {id: image file}, {annotator: {id: mask file}})``, ids sorted, each file's bytes decompressed."""
    images = read_archive(raw_dir / IMAGES_ARCHIVE, ".ppm.gz")
    if not images:
        raise ArchiveError(f"{IMAGES_ARCHIVE}: no images")
    ids = sorted(images)
    masks = {}
    for annotator in STARE_ANNOTATORS:
        archive = LABELS_ARCHIVE.format(annotator)
        labels = read_archive(raw_dir / archive, f".{annotator}.ppm.gz")
        missing, extra = sorted(set(ids) - set(labels)), sorted(set(labels) - set(ids))
        if missing:
            raise ArchiveError(f"{archive}: no mask for image(s) {missing}")
        if extra:
            raise ArchiveError(f"{archive}: mask(s) for {extra}, which {IMAGES_ARCHIVE} does not have")
        masks[annotator] = labels
    return ids, images, masks


def fit_circle(points: np.ndarray, tolerance: float = 3.0) -> tuple[CircleModel | None, np.ndarray]:
    """The circle most ``(x, y)`` points lie on within ``tolerance``, and those points (None: all collinear); a
    deterministic RANSAC over triples a third of the way round from each other, then refitted (docs/datasets.md)."""
    centred = points - points.mean(axis=0)
    order = np.argsort(np.arctan2(centred[:, 1], centred[:, 0]))
    third = len(points) // 3
    inliers = np.zeros(len(points), dtype=bool)
    for start in np.linspace(0, third, 24, endpoint=False).astype(int):
        circle = CircleModel.from_estimate(points[order[[start, start + third, start + 2 * third]]])
        if circle:  # falsy where the triple is collinear
            agree = np.abs(circle.residuals(points)) <= tolerance
            if agree.sum() > inliers.sum():
                inliers = agree
    if not inliers.any():
        return None, inliers
    for _ in range(3):
        circle = CircleModel.from_estimate(points[inliers])
        inliers = np.abs(circle.residuals(points)) <= tolerance
    return circle, inliers


def field_of_view(image: np.ndarray, threshold: float, smoothing: float, erosion: int) -> np.ndarray:
    """The fundus disc of an RGB image as a bool (H, W) mask (method: docs/datasets.md)."""
    red = image[:, :, 0].astype(np.float32)
    if smoothing > 0:
        red = ndi.gaussian_filter(red, smoothing)
    labels = label(red > threshold, connectivity=1)  # 4-connected: glare touching the disc at a corner stays out
    regions = regionprops(labels)
    if not regions:
        raise ValueError(f"no pixel brighter than fov_threshold={threshold}")
    bright = ndi.binary_fill_holes(labels == max(regions, key=lambda region: region.area).label)
    # The aperture circle, fitted to the bright region's edge, less the image border and the chords the frame clips.
    rows = np.flatnonzero(bright.any(axis=1))
    top, bottom = rows[0], rows[-1]
    ys, xs = np.nonzero(find_boundaries(bright, mode="inner"))
    on_arc = (ys > top + 3) & (ys < bottom - 3)
    if on_arc.sum() < 10:
        raise ValueError("the bright region has no curved edge to fit the aperture circle to")
    circle, inliers = fit_circle(np.column_stack([xs[on_arc], ys[on_arc]]).astype(float))
    if inliers.mean() < 0.5:
        raise ValueError(
            f"the bright region's edge is not a circle ({inliers.mean():.0%} of it fits one); "
            f"is fov_threshold={threshold} right for this image?"
        )
    (cx, cy), r = circle.center, circle.radius
    y, x = np.ogrid[: image.shape[0], : image.shape[1]]
    disc = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) & (y >= top) & (y <= bottom)

    fov = bright | disc  # the disc restores dark rims; the bright region keeps the notch
    if erosion > 0:
        # mode="ignore": where the disc is cut by the image border the border is not an edge of the fundus.
        fov = morphology.erosion(fov, morphology.disk(erosion), mode="ignore")
    return fov


def split_ids(ids: list[str], params: PrepareParams) -> dict[str, list[str]]:
    """Resolve ``params.split`` and ``params.val_ids`` against the ids present; errors name the parameter."""
    known = set(ids)
    if params.split == "standard":
        missing = sorted(set(STANDARD_TRAIN + STANDARD_TEST) - known)
        if missing:
            raise ParamError(f"{PARAMS_KEY}.split: the standard split needs {missing}, not in {IMAGES_ARCHIVE}")
        train, test = list(STANDARD_TRAIN), list(STANDARD_TEST)
    else:
        held_out = params.split.removeprefix("loo:")
        if held_out not in known:
            raise ParamError(f"{PARAMS_KEY}.split: unknown image id {held_out!r} (ids: {' '.join(ids)})")
        train, test = [i for i in ids if i != held_out], [held_out]
    unknown = [i for i in params.val_ids if i not in known]
    if unknown:
        raise ParamError(f"{PARAMS_KEY}.val_ids: unknown image id(s) {unknown}")
    in_test = [i for i in params.val_ids if i in test]
    if in_test:
        raise ParamError(f"{PARAMS_KEY}.val_ids: {in_test} also in the test split ({params.split})")
    val = [i for i in train if i in params.val_ids]  # in train order, so the result does not depend on YAML order
    train = [i for i in train if i not in params.val_ids]
    if not train:
        raise ParamError(f"{PARAMS_KEY}.val_ids: leaves no image to train on")
    return {"train": train, "val": val, "test": test}


FOV_FRACTION = "fov fraction of "  # + an id: one image's own figure in a split's tally


def tally(samples: list[Sample], annotator: str, other: str) -> dict:
    """Pixels in the FOV and of vessels (inside it, anywhere, outside it) per annotator, and each image's
    fraction of pixels in the FOV."""
    counts: dict = {"fov": 0, "all pixels": 0}
    for sample in samples:
        counts["fov"] += int(sample.fov.sum())
        counts["all pixels"] += sample.fov.size
        counts[FOV_FRACTION + sample.id] = float(sample.fov.mean())
        for key, mask in ((annotator, sample.mask), (other, sample.reference)):
            vessels = mask.astype(bool)
            inside, outside = int((vessels & sample.fov).sum()), int((vessels & ~sample.fov).sum())
            for where, count in (("in_fov", inside), ("all", int(vessels.sum())), ("outside", outside)):
                counts[f"{key} {where}"] = counts.get(f"{key} {where}", 0) + count
    vessels = counts.get(f"{annotator} in_fov", 0)
    counts["pixels"] = np.array([counts["fov"] - vessels, vessels], np.int64)
    return counts


def summarize(counts: dict, split: PreparedSplit, annotator: str, other: str) -> tuple[dict, dict[str, float]]:
    """The split's summary (pixels pooled over its images), and each image's fraction of pixels in the FOV."""
    if not len(split):  # an empty validation split
        # Not even an empty list of ids: an empty list in a plots JSON file makes `dvc plots show` fail.
        return {"images": 0}, {}
    fov_pixels, pixels = counts["fov"], counts["all pixels"]
    fractions = {key[len(FOV_FRACTION) :]: value for key, value in counts.items() if key.startswith(FOV_FRACTION)}
    summary: dict = {"images": len(split), "ids": list(split.ids), "fov_fraction": fov_pixels / pixels}
    for key in (annotator, other):
        summary[key] = {
            "vessel_fraction_in_fov": counts[f"{key} in_fov"] / fov_pixels,
            "vessel_fraction_of_all_pixels": counts[f"{key} all"] / pixels,
            # Should be ~0: a larger value means the FOV cuts off traced vessels.
            "fraction_of_vessel_pixels_outside_fov": counts[f"{key} outside"] / max(counts[f"{key} all"], 1),
        }
    return summary, fractions


# The decompressed raw files of the plan being prepared: read once, shared with the forked decoding workers.
_RAW: dict[str, dict] = {}


def decode(source: Source, params: PrepareParams) -> Sample:
    """Image ``source.id``, its ground truth and reference masks, and its field of view."""
    size, other = tuple(params.image_size), next(a for a in STARE_ANNOTATORS if a != params.annotator)
    masks = {}
    for annotator in STARE_ANNOTATORS:  # 0 / 255 vessel tracings
        name = f"{LABELS_ARCHIVE.format(annotator)}:{source.id}.{annotator}.ppm.gz"
        mask = parse_pnm(_RAW["masks"][annotator][source.id], name, channels=1, size=size)
        values = np.unique(mask)
        if not set(values.tolist()) <= {0, 255}:
            raise StageError(f"{name}: not a binary mask, values {values[:10].tolist()} (expected only 0 and 255)")
        masks[annotator] = (mask == 255).astype(np.uint8)
    image = parse_pnm(_RAW["images"][source.id], f"{IMAGES_ARCHIVE}:{source.id}.ppm.gz", 3, size)
    try:
        fov = field_of_view(image, params.fov_threshold, params.fov_smoothing, params.fov_erosion)
    except ValueError as e:
        raise StageError(f"{IMAGES_ARCHIVE}:{source.id}: cannot find the field of view: {e}") from None
    return Sample(source.id, np.ascontiguousarray(image), masks[params.annotator], fov, masks[other])


def plan(raw_dir: Path, params: PrepareParams) -> Plan:
    ids, images, masks = load_raw(Path(raw_dir))
    names = split_ids(ids, params)  # before any decoding, so a bad split fails at once
    _RAW.update(images=images, masks=masks)

    def source(image_id: str) -> Source:
        digest = hashlib.sha256(images[image_id])
        for annotator in STARE_ANNOTATORS:
            digest.update(masks[annotator][image_id])
        return Source(image_id, digest.hexdigest())

    other = next(a for a in STARE_ANNOTATORS if a != params.annotator)

    def summary(tallies: dict[str, dict], written: dict[str, PreparedSplit]) -> dict:
        splits, fractions = {}, {}
        for name, split in written.items():
            splits[name], per_image = summarize(tallies[name], split, params.annotator, other)
            fractions.update(per_image)
        return {
            "annotator": params.annotator,
            "reference_annotator": other,
            "split": params.split,
            **splits,
            "fov_fraction_per_image": dict(sorted(fractions.items())),
        }

    meta = DatasetMeta(name="stare", task="binary", classes=CLASSES, colors=COLORS)
    return Plan(
        meta,
        {name: [source(i) for i in members] for name, members in names.items()},
        functools.partial(each, functools.partial(decode, params=params)),
        functools.partial(tally, annotator=params.annotator, other=other),
        summary,
    )
