"""A binary model on its test images under the shifts a new camera brings: ``python -m benchmarks.robustness``.

Run from the repository root once ``data/models/<ds>/release.pt`` and ``data/prepared/<ds>`` are in the workspace
(default dataset: stare). Each shift changes the test images only; the model predicts one image at a time with
the release's test-time augmentation, and every prediction is scored on the original pixel grid inside the field
of view: F1 and sensitivity at the release's threshold (or ``--threshold``), and the threshold that would have
given the best F1 (exact, counted as evaluate counts). A rescaled image's probabilities are resized back to the
original grid.
Prints a table and writes it to ``benchmarks/results/robustness-<ds>.json``; nothing else is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.filters import gaussian
from skimage.transform import resize

from pipeline.checkpoint import load_model_file, release_path
from pipeline.confusion import binary_metrics
from pipeline.inference import predict_batches
from pipeline.metrics import ProbabilityCounts
from pipeline.prepared import open_split
from pipeline.runtime import cpu_isa, setup
from pipeline.stage import DatasetPaths


def rescaled(factor: float):
    def shift(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        size = (round(h * factor), round(w * factor))
        out = resize(image, size, order=1, anti_aliasing=factor < 1, preserve_range=True)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    return shift


def gamma(value: float):
    return lambda image: np.rint(255 * (image / 255.0) ** value).astype(np.uint8)


def colour_balance(image: np.ndarray) -> np.ndarray:
    """A warmer white balance: red up 15 %, blue down 15 %."""
    return np.clip(np.rint(image * np.array([1.15, 1.0, 0.85])), 0, 255).astype(np.uint8)


def blurred(image: np.ndarray) -> np.ndarray:
    out = gaussian(image.astype(np.float64), sigma=1, channel_axis=-1, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=40)
    return np.array(Image.open(buffer).convert("RGB"))  # a writable copy: torch warns on a read-only array


def lower_contrast(image: np.ndarray) -> np.ndarray:
    """Contrast 0.6 about each channel's mean."""
    mean = image.reshape(-1, image.shape[-1]).mean(axis=0)
    return np.clip(np.rint(mean + 0.6 * (image - mean)), 0, 255).astype(np.uint8)


SHIFTS = {
    "clean": lambda image: image,
    "rescale 0.8x": rescaled(0.8),
    "rescale 1.25x": rescaled(1.25),
    "gamma 0.7": gamma(0.7),
    "gamma 1.4": gamma(1.4),
    "colour balance (R +15 %, B -15 %)": colour_balance,
    "Gaussian blur sigma 1": blurred,
    "JPEG quality 40": jpeg,
    "contrast 0.6": lower_contrast,
}


def probabilities(model, image: np.ndarray, size: tuple[int, int], release, device) -> torch.Tensor:
    """The foreground probability (float32) of ``image`` on the (H, W) grid ``size``."""
    ((_, logits),) = predict_batches(model, image[None], 1, device, release.tta)
    prob = torch.sigmoid(logits[0, 0])
    return prob if prob.shape == size else torch.from_numpy(resize(prob.numpy(), size, order=1).astype(np.float32))


def score(counts: ProbabilityCounts, threshold: float) -> dict:
    """F1 and sensitivity at ``threshold``, and the threshold with the best F1, as evaluate counts them."""
    at = binary_metrics(*counts.counts_at(threshold))
    best_threshold, best_f1 = counts.best_f1_threshold()
    return {"f1": at["f1"], "sensitivity": at["sensitivity"], "best_threshold": best_threshold, "best_f1": best_f1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", default="stare")
    parser.add_argument("--model", type=Path, help="default: data/models/<dataset>/release.pt")
    parser.add_argument("--threshold", type=float, help="operating threshold (default: the release's)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/robustness-<dataset>.json")
    args = parser.parse_args(argv)
    paths = DatasetPaths(args.dataset)
    device = setup(0)
    model_file = load_model_file(args.model or release_path(paths), writer="evaluate")
    release = model_file.evaluation
    if args.threshold is not None:
        release = dataclasses.replace(release, threshold=args.threshold)
    model = model_file.build(device)
    test = open_split(paths.prepared, "test")
    samples = [test.read(i, ("image", "mask", "fov")) for i in range(len(test))]
    print(f"{args.dataset}: {len(samples)} test images, threshold {release.threshold:g}, TTA {release.tta}")
    print(f"{'shift':<36} {'F1':>7} {'sens.':>7} {'best thr.':>9} {'best F1':>8} {'s':>5}")
    rows = {}
    for name, shift in SHIFTS.items():
        start = time.perf_counter()
        counts = ProbabilityCounts()
        for s in samples:
            counts.update(probabilities(model, shift(s.image), s.mask.shape, release, device), s.mask, s.fov)
        rows[name] = {**score(counts, release.threshold), "seconds": time.perf_counter() - start}
        r = rows[name]
        print(
            f"{name:<36} {r['f1']:>7.4f} {r['sensitivity']:>7.4f} {r['best_threshold']:>9.3f} {r['best_f1']:>8.4f} "
            f"{r['seconds']:>5.0f}",
            flush=True,
        )
    out = args.out or Path("benchmarks/results") / f"robustness-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": cpu_isa(), "python": platform.python_version(), "torch": torch.__version__}
    result = {"model": str(model_file.path), "threshold": release.threshold, "tta": release.tta, **machine}
    out.write_text(json.dumps({**result, "shifts": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
