"""predict on STARE's own test images, timed and checked against evaluate: ``python -m benchmarks.predict_throughput``.

Run from the repository root once ``data/models/stare/release.pt`` and the prepared ``data/prepared/stare`` test
split are in the workspace (``dvc pull`` or ``dvc checkout``). It writes the test split's images as PNG files into
a temporary directory, runs ``pipeline.predict``'s ``main`` on them (model loading included, Python's and torch's
import excluded), and compares the label masks and probability maps it wrote, bit for bit, with what evaluate
computes from the prepared test split (``predict_batches`` with the release's batch size and TTA,
``logits_to_labels`` at its threshold). Then it runs predict again with tiles forced (``--max-side 512 --tile
384``) and says how far the tiled result is from the whole-image one. Nothing in the repository is written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import predict
from pipeline.checkpoint import load_model_file, release_path
from pipeline.inference import logits_to_labels, predict_batches
from pipeline.prepared import load_split
from pipeline.runtime import cpu_isa
from pipeline.stage import DatasetPaths
from pipeline.viz import PROBABILITY_LEVELS

DATASET = "stare"
TILED = ["--max-side", "512", "--tile", "384", "--overlap", "128"]  # 605 x 700 -> 2 x 2 tiles


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def evaluate_predictions(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the test images as evaluate computes them, on the device predict ran on."""
    released = load_model_file(release_path(DatasetPaths(DATASET)), "evaluate")
    settings = released.evaluation  # the operating point evaluate scored at, which predict takes from the file
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = released.build(device)
    views = predict_batches(model, images, settings.batch_size, device, settings.tta)  # the views predict averages too
    logits = torch.cat([logits for _, logits in views])
    return logits_to_labels(logits, settings.threshold).numpy(), torch.sigmoid(logits[:, 0]).numpy()


def run_predict(arguments: list[str]) -> tuple[int, float, str]:
    """(exit status, wall seconds, predict's own summary line) of one call of predict's main."""
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        status = predict.main(arguments)
    return status, time.perf_counter() - started, printed.getvalue().strip()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture)


def read_outputs(out: Path, ids) -> tuple[np.ndarray, np.ndarray]:
    """(label masks, probability levels 0-65535) that predict wrote for the images ``ids``."""
    labels = np.stack([pixels(out / f"{i}.png") for i in ids])
    return labels, np.stack([pixels(out / f"{i}_prob.png") for i in ids]).astype(np.int64)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.strip().splitlines()[0]).parse_args()
    test = load_split(DatasetPaths(DATASET).prepared, "test")
    with tempfile.TemporaryDirectory(prefix="predict-throughput-") as tmp:
        inputs, out, tiled_out = Path(tmp) / "images", Path(tmp) / "out", Path(tmp) / "tiled"
        inputs.mkdir()
        for image, name in zip(test.images, test.ids):
            Image.fromarray(image).save(inputs / f"{name}.png")

        status, seconds, summary = run_predict([DATASET, str(inputs), "--out", str(out)])
        if status != 0:
            print(summary, file=sys.stderr)
            return status
        labels, levels = read_outputs(out, test.ids)
        tiled_status, tiled_seconds, _ = run_predict([DATASET, str(inputs), "--out", str(tiled_out), *TILED])
        tiled_labels, tiled_levels = read_outputs(tiled_out, test.ids)

    expected_labels, expected_probabilities = evaluate_predictions(test.images)
    expected_levels = np.rint(expected_probabilities.astype(np.float64) * PROBABILITY_LEVELS)
    n, pixels = len(test), test.images.shape[0] * test.images.shape[1] * test.images.shape[2]
    rows = [
        ("images", f"{n} ({test.images.shape[2]} x {test.images.shape[1]} PNG)"),
        ("seconds (predict's main, model load included)", f"{seconds:.2f}"),
        ("images/s", f"{n / seconds:.2f}"),
        ("Mpixel/s", f"{pixels / 1e6 / seconds:.2f}"),
        ("predict's own summary", summary),
        (
            "labels identical to evaluate's",
            "yes"
            if np.array_equal(labels, expected_labels)
            else f"NO ({int((labels != expected_labels).sum())} pixels differ)",
        ),
        (
            "probability PNGs identical to evaluate's",
            "yes"
            if np.array_equal(levels, expected_levels)
            else f"NO (up to {int(np.abs(levels - expected_levels).max())} levels of 65535)",
        ),
        (f"tiled ({' '.join(TILED)}): seconds", f"{tiled_seconds:.2f}" + ("" if tiled_status == 0 else " (failed)")),
        (
            "tiled labels identical to whole-image ones",
            "yes"
            if np.array_equal(tiled_labels, labels)
            else f"NO ({int((tiled_labels != labels).sum())} pixels differ)",
        ),
        ("tiled probabilities, largest difference", f"{int(np.abs(tiled_levels - levels).max())} levels of 65535"),
        ("CPU", f"{cpu_model()}, {cpu_isa()}"),
        ("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
        ("torch threads", str(torch.get_num_threads())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    identical = np.array_equal(labels, expected_labels) and np.array_equal(levels, expected_levels)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
