"""Training-step throughput across process counts and precisions: ``python -m benchmarks.scaling [--steps N]``.

The default MNIST recipe's model (SimpleUNet width 16, 11 classes, 28x28, channels-last, Adam) at a global
batch of 128 on synthetic data (no augmentation, no data loading: the steps alone), built from the product's
own pieces (``pipeline.losses``, ``pipeline.distributed``, ``pipeline.precision``). Prints images/s of
training steps for

(a) 1 process x 2 threads against 2 processes x 1 thread (gloo, DistributedDataParallel, global batch norm
    and loss: what ``processes: 2`` runs), and
(b) fp32 against bf16 autocast, 1 process x 2 threads,

with the CPU's instruction set, since bf16 is fast only with native bf16 (pipeline/precision.py); and

(c) the quality bf16 costs: the same short recipe (the first ``--quality-images`` prepared MNIST training
    images, one epoch, one-cycle learning rate, no augmentation) trained in fp32 and in bf16 autocast, each
    scored by evaluate's own code on the whole test split (in float32, as evaluate scores any checkpoint):
    test Dice and the training's images/s. It calls the training pieces directly, so it runs bf16 even where
    ``precision: bf16`` is refused (CPUs without native bf16) -- that is the point of measuring it.

Each
variant runs in fresh processes (thread pools and allocator state never carry over); figures on a shared
machine move by +-15 % from run to run, so compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, WIDTH, CLASSES, SIDE = 128, 16, 11, 28
WARMUP = 2
REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "data/prepared/mnist"  # (c) reads the prepared data: run `dvc repro prepare@mnist` first
QUALITY_IMAGES, QUALITY_LR = 10_000, 0.003


def _steps(rank: int, world: int, threads: int, precision: str, steps: int, init: str | None) -> dict:
    import torch
    import torch.distributed as dist

    from pipeline import distributed
    from pipeline import precision as amp
    from pipeline.inference import to_input
    from pipeline.losses import LOSSES, global_value
    from pipeline.models import build_model
    from pipeline.runtime import setup

    device = setup(0, threads)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        group = distributed.Group(rank, world, 0, device, None)
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": CLASSES, "width": WIDTH})
    model = model.to(memory_format=torch.channels_last)
    if group is not None:
        model = distributed.synchronize_batchnorm(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    net = torch.nn.parallel.DistributedDataParallel(model) if group is not None else model
    generator = torch.Generator().manual_seed(rank)
    per_rank = BATCH // world
    images = torch.randint(0, 256, (per_rank, SIDE, SIDE, 1), dtype=torch.uint8, generator=generator)
    targets = torch.randint(0, CLASSES, (per_rank, SIDE, SIDE), dtype=torch.uint8, generator=generator)
    cross_entropy = LOSSES["cross_entropy"]["multiclass"]
    net.train()

    def step():
        with amp.autocast(precision, device):
            logits = net(to_input(images, device))
        logits = logits.float()
        # Several processes: the loss of the global batch, as the train stage's is.
        loss = cross_entropy(logits, targets) if group is None else global_value(cross_entropy, logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(WARMUP):
        step()
    if group is not None:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if group is not None:
        dist.barrier()
    elapsed = time.perf_counter() - start
    if group is not None:
        dist.destroy_process_group()
    return {"images_per_s": steps * BATCH / elapsed, "threads": torch.get_num_threads()}


def _quality(precision: str, images: int) -> dict:
    """Train the short recipe in ``precision``; test Dice (float32 scoring) and training images/s."""
    import torch

    from pipeline import precision as amp
    from pipeline.inference import to_input
    from pipeline.losses import LOSSES
    from pipeline.models import build_model
    from pipeline.prepared import load_meta, load_split, open_split
    from pipeline.runtime import setup
    from pipeline.scoring import evaluate_multiclass

    device = setup(0, 2)
    # The training images in memory; the test split read from its shards, as evaluate reads it.
    meta, train, test = load_meta(MNIST), load_split(MNIST, "train"), open_split(MNIST, "test")
    model = build_model(
        {"arch": "simple_unet", "in_channels": 1, "out_channels": meta.model_outputs, "width": WIDTH}
    ).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=QUALITY_LR)
    order = torch.randperm(images)
    steps = -(-images // BATCH)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=QUALITY_LR, total_steps=steps)
    targets = torch.from_numpy(train.masks)
    cross_entropy = LOSSES["cross_entropy"]["multiclass"]
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        index = order[i * BATCH : (i + 1) * BATCH]
        with amp.autocast(precision, device):
            logits = model(to_input(train.images[index.numpy()], device))
        loss = cross_entropy(logits.float(), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    elapsed = time.perf_counter() - start
    headline, _, _ = evaluate_multiclass(model, meta, test, 500, device)
    return {"test_dice": headline["dice"], "images_per_s": images / elapsed, "images": images, "cpu": cpu_description()}


def _rank_main(rank: int, world: int, threads: int, precision: str, steps: int, init: str, out: str) -> None:
    result = _steps(rank, world, threads, precision, steps, init)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def worker(args: argparse.Namespace) -> None:
    """One variant, in this fresh process (and, for several processes, the ranks it spawns)."""
    if args.quality_images:
        print(json.dumps(_quality(args.precision, args.quality_images)))
        return
    if args.processes == 1:
        print(json.dumps(_steps(0, 1, args.threads, args.precision, args.steps, None)))
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(
            _rank_main,
            args=(args.processes, args.threads, args.precision, args.steps, os.path.join(tmp, "init"), out),
            nprocs=args.processes,
            join=True,
        )
        with open(out) as f:
            print(f.read())


def measure(processes: int, threads: int, precision: str, steps: int, quality_images: int = 0) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.scaling",
            "--worker",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--precision",
            precision,
            "--steps",
            str(steps),
            "--quality-images",
            str(quality_images),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    if done.returncode:
        raise SystemExit(f"{processes} x {threads} {precision} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_description() -> str:
    """The CPU's model name and best ISA, and whether it has native bf16: what every figure here depends on."""
    import platform

    from pipeline.precision import native_bf16_cpu
    from pipeline.runtime import cpu_isa

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        cpu = None
    return f"{cpu or platform.machine()}, best ISA {cpu_isa()}, native bf16 {'yes' if native_bf16_cpu() else 'no'}"


def scaling(steps: int, bf16_steps: int, quality_images: int) -> dict:
    """Every variant, one after another in this order: (a) process counts, (b) precisions, (c) bf16's quality.
    Each in subprocesses: this process imports nothing but the standard library."""
    result = {
        "1x2_fp32": measure(1, 2, "fp32", steps),
        "2x1_fp32": measure(2, 1, "fp32", steps),
        "fp32": measure(1, 2, "fp32", steps),
        "bf16": measure(1, 2, "bf16", bf16_steps),
        "quality_fp32": measure(1, 2, "fp32", 0, quality_images),
        "quality_bf16": measure(1, 2, "bf16", 0, quality_images),
    }
    return {"cpu": result["quality_fp32"]["cpu"], **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per fp32 variant (after 2 warm-up steps)")
    parser.add_argument("--bf16-steps", type=int, default=3, help="timed steps for bf16 (slow without native bf16)")
    parser.add_argument(
        "--quality-images",
        type=int,
        default=QUALITY_IMAGES,
        help="(c): training images of the short recipe (default %(default)s)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.worker:
        worker(args)
        return

    import torch

    from pipeline.runtime import usable_cores

    result = scaling(args.steps, args.bf16_steps, args.quality_images)
    print(
        f"SimpleUNet width {WIDTH}, {CLASSES} classes, {SIDE}x{SIDE}, global batch {BATCH}; CPU {result['cpu']}, "
        f"{usable_cores()} usable cores, torch {torch.__version__}"
    )
    for name, key in (
        ("(a) 1 process x 2 threads, fp32, steps", "1x2_fp32"),
        ("(a) 2 processes x 1 thread, fp32 (gloo), steps", "2x1_fp32"),
        ("(b) 1 process x 2 threads, fp32, steps", "fp32"),
        ("(b) 1 process x 2 threads, bf16 autocast, steps", "bf16"),
    ):
        print(f"{name:50s} {result[key]['images_per_s']:8.1f} images/s")
    for precision in ("fp32", "bf16"):
        q = result[f"quality_{precision}"]
        print(
            f"(c) {precision}: {q['images']} images, one epoch: {q['images_per_s']:.1f} images/s, "
            f"test Dice {q['test_dice']:.4f}"
        )
    speed = {key: result[key]["images_per_s"] for key in ("1x2_fp32", "2x1_fp32", "fp32", "bf16")}
    print(
        f"(a) 2 processes / 1 process: {speed['2x1_fp32'] / speed['1x2_fp32']:.2f}x;"
        f"  (b) bf16 / fp32: {speed['bf16'] / speed['fp32']:.3f}x"
    )


if __name__ == "__main__":
    main()
