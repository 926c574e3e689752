"""Segment image files with a trained model: ``python -m pipeline.predict (--model FILE | DATASET) INPUT... --out DIR``.

A dataset's name runs ``data/models/DATASET/release.pt`` (train's ``model.pt`` before evaluate has run). Not a DVC
stage; the work is pipeline/segment.py's, imported after the arguments so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.stage import StageError, dataset_name, shown_name

USAGE = "python -m pipeline.predict (--model FILE | DATASET) INPUT [INPUT ...] --out DIR [options]"
MAX_SCALE = 16  # as a folder dataset's prepare.scale allows
TTA_NAMES = ("none", "flips", "dihedral")  # pipeline.inference.TTA's, named here to keep torch out of --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        usage=USAGE,
        description="Segment images with a trained model: a label mask, a probability map (binary tasks) and an "
        "overlay per image. Give the model file with --model, or, inside the project, a dataset's name.",
        epilog="Outputs, tiling, batching and errors: docs/inference.md.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, or directories searched recursively for image files; without --model, the first is "
        "a dataset of params.yaml whose model is trained (data/models/DATASET/release.pt, else model.pt)",
    )
    parser.add_argument("--model", type=Path, metavar="FILE", help="a model file (release.pt or model.pt) to run")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (made if needed)")
    parser.add_argument("--threshold", type=float, help="binary tasks: default the model file's, else 0.5")
    parser.add_argument("--tta", choices=TTA_NAMES, help="test-time augmentation: default the model file's")
    parser.add_argument("--batch-size", type=int, help="images per forward pass: default the model file's")
    parser.add_argument("--scale", type=float, help="resize factor before the model: default the model file's")
    parser.add_argument("--max-side", type=int, default=2048, help="larger images are tiled (default %(default)s)")
    parser.add_argument(
        "--tile", type=int, default=1024, help="tile side, rounded down to the model's multiple (default %(default)s)"
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=128,
        help="context kept around each tile's centre, rounded up to the model's multiple (default %(default)s)",
    )
    parser.add_argument(
        "--valid", metavar="PATTERN", help="validity mask of each input, e.g. 'masks/{stem}_fov.png' (nonzero = valid)"
    )
    parser.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg", help="default %(default)s")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per usable core)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options anywhere among the inputs
    args.dataset = None
    if args.model is None:
        args.dataset = args.inputs.pop(0)
        if not args.inputs:
            parser.error("give the images to segment after the dataset's name (or the model file with --model)")
    args.inputs = [Path(name) for name in args.inputs]
    for name, least in {"batch_size": 1, "max_side": 1, "tile": 1, "threads": 1, "overlap": 0}.items():
        if (value := getattr(args, name)) is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if args.scale is not None and not 0 < args.scale <= MAX_SCALE:
        parser.error(f"--scale must be in (0, {MAX_SCALE}], got {args.scale}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    label = "predict" if args.dataset is None else f"predict {shown_name(args.dataset)}"
    try:
        if args.dataset is not None:
            dataset_name(args.dataset)  # before anything is read or written
        from pipeline.segment import predict_files  # torch, numpy, Pillow: after the arguments

        return predict_files(args, label)
    except StageError as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
