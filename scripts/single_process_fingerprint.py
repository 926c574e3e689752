"""Does a one-process CPU training still give the very same weights? ``train`` with one code tree, then another,
then ``compare``.

    python scripts/single_process_fingerprint.py train --code /tmp/segpipe-base --out /tmp/before.pt
    python scripts/single_process_fingerprint.py train --code . --out /tmp/after.pt
    python scripts/single_process_fingerprint.py compare /tmp/before.pt /tmp/after.pt

``train`` makes small synthetic prepared datasets in a temporary directory and runs
``python -m pipeline.train`` on each (a subprocess whose PYTHONPATH is ``--code``, on the CPU) under the tiny
configurations the tests use: the resume tests' multiclass one (one thread, one-cycle, nearest affine), the
training tests' binary one (all usable threads, bce_dice, flips and affine), and a STARE-like patch one
(vgg_unet, patches, sampling with replacement, every augmentation). It saves every resulting state dict, and
the metrics.json of each, to ``--out``. ``compare`` says, per configuration, whether every tensor is equal
bit for bit (``torch.equal`` and the same dtype), and exits 1 if any is not. Params not given take their
defaults, so a code tree with new train settings (processes, precision) runs them at their defaults.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

CONFIGS = {
    "multiclass_1thread": (
        "multiclass",
        {
            "arch": "simple_unet",
            "width": 4,
            "epochs": 3,
            "batch_size": 8,
            "lr": 0.01,
            "schedule": "onecycle",
            "augment": {"affine": {"p": 1.0, "interpolation": "nearest"}},
            "val_batch_size": 32,
            "seed": 0,
            "threads": 1,
        },
    ),
    "binary_all_threads": (
        "binary",
        {
            "arch": "simple_unet",
            "width": 4,
            "epochs": 2,
            "batch_size": 8,
            "lr": 0.01,
            "loss": "bce_dice",
            "augment": {"flips": True, "affine": {"p": 0.5}},
        },
    ),
    "patches_vgg": (
        "binary",
        {
            "arch": "vgg_unet",
            "width": 4,
            "epochs": 2,
            "batch_size": 4,
            "lr": 0.01,
            "loss": "bce_dice",
            "schedule": "onecycle",
            "patch_size": 16,
            "samples_per_epoch": 40,
            "threads": 1,
            "augment": {
                "flips": True,
                "rotate90": True,
                "brightness_contrast": 0.1,
                "gamma": 0.1,
                "affine": {"p": 0.5, "rotate": 15},
            },
        },
    ),
}


def make_data(root: Path, task: str, code: Path) -> None:
    sys.path.insert(0, str(code))
    from pipeline.prepared import DatasetMeta, Split, save_prepared

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        if task == "multiclass":
            labels = rng.integers(0, 10, n)
            images = rng.integers(0, 30, (n, 28, 28, 1), dtype=np.uint8)
            for i, label in enumerate(labels):
                images[i, 4 + 2 * label : 10 + 2 * label, 8:20] = 200
            masks = np.where(images[..., 0] > 51, labels[:, None, None] + 1, 0).astype(np.uint8)
        else:
            images = rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)
            masks = (images[..., 0] > 128).astype(np.uint8)
        return Split(images=images, masks=masks, ids=np.arange(n).astype(str))

    if task == "multiclass":
        meta = DatasetMeta(
            name="toy",
            task="multiclass",
            classes=["background"] + [f"digit {d}" for d in range(10)],
            colors=[[20 * i, 0, 0] for i in range(11)],
        )
    else:
        meta = DatasetMeta(name="toy", task="binary", classes=["background", "thing"], colors=[[0, 0, 0], [255, 0, 0]])
    save_prepared(root / "data/prepared/toy", meta, {"train": split(48), "val": split(16), "test": split(8)})


def train(code: Path, out: Path) -> None:
    results = {}
    for name, (task, section) in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            make_data(root, task, code)
            (root / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": section}}))
            env = {**os.environ, "PYTHONPATH": str(code), "CUDA_VISIBLE_DEVICES": ""}
            done = subprocess.run(
                [sys.executable, "-m", "pipeline.train", "toy"], cwd=root, env=env, capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(f"{name}: training failed:\n{done.stdout}\n{done.stderr}")
            results[name] = {
                "state_dict": torch.load(root / "data/models/toy/model.pt", weights_only=True)["state_dict"],
                "metrics": (root / "metrics/toy/train/metrics.json").read_text(),
            }
            print(f"{name}: {done.stdout.strip().splitlines()[-1]}")
    torch.save(results, out)


def compare(a: Path, b: Path) -> int:
    first, second = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    failures = 0
    for name in CONFIGS:
        x, y = first[name]["state_dict"], second[name]["state_dict"]
        differ = [k for k in x if k not in y or x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
        differ += [k for k in y if k not in x]
        failures += bool(differ)
        verdict = "identical" if not differ else f"DIFFER in {len(differ)} tensors ({', '.join(differ[:3])})"
        print(f"{name}: {len(x)} tensors, {sum(t.numel() for t in x.values()):,} values: {verdict}")
        print(f"  before: {first[name]['metrics'].strip()}")
        print(f"  after:  {second[name]['metrics'].strip()}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--code", type=Path, required=True, help="a directory holding the pipeline package to run")
    t.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "train":
        train(args.code.resolve(), args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
