"""Training-step throughput across process counts and precisions: ``python -m benchmarks.scaling [--steps N]``.

The default MNIST recipe's model (SimpleUNet width 16, 11 classes, 28x28, channels-last, Adam) at a global
batch of 128 on synthetic data (no augmentation, no data loading: the steps alone), built from the product's
own pieces (``pipeline.train.loss_fn``, ``pipeline.distributed``, ``pipeline.precision``). Prints images/s of
training steps for

(a) 1 process x 2 threads against 2 processes x 1 thread (gloo, DistributedDataParallel, global batch norm
    and loss: what ``processes: 2`` runs), and
(b) fp32 against bf16 autocast, 1 process x 2 threads,

with the CPU's instruction set, since bf16 is fast only with native bf16 (pipeline/precision.py). Each
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

BATCH, WIDTH, CLASSES, SIDE = 128, 16, 11, 28
WARMUP = 2


def _steps(rank: int, world: int, threads: int, precision: str, steps: int, init: str | None) -> dict:
    import torch
    import torch.distributed as dist

    from pipeline import distributed
    from pipeline import precision as amp
    from pipeline.inference import to_input
    from pipeline.models import build_model
    from pipeline.runtime import setup
    from pipeline.train import loss_fn

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
    net.train()

    def step():
        with amp.autocast(precision, device):
            logits = net(to_input(images, device))
        loss = loss_fn(logits.float(), targets, "cross_entropy", group)
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


def _rank_main(rank: int, world: int, threads: int, precision: str, steps: int, init: str, out: str) -> None:
    result = _steps(rank, world, threads, precision, steps, init)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def worker(args: argparse.Namespace) -> None:
    """One variant, in this fresh process (and, for several processes, the ranks it spawns)."""
    if args.processes == 1:
        print(json.dumps(_steps(0, 1, args.threads, args.precision, args.steps, None)))
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(args.processes, args.threads, args.precision, args.steps,
                                   os.path.join(tmp, "init"), out), nprocs=args.processes, join=True)
        with open(out) as f:
            print(f.read())


def measure(processes: int, threads: int, precision: str, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--worker", "--processes", str(processes),
                           "--threads", str(threads), "--precision", precision, "--steps", str(steps)],
                          capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if done.returncode:
        raise SystemExit(f"{processes} x {threads} {precision} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per fp32 variant (after 2 warm-up steps)")
    parser.add_argument("--bf16-steps", type=int, default=3, help="timed steps for bf16 (slow without native bf16)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if args.worker:
        worker(args)
        return

    import platform

    import torch

    from pipeline.precision import native_bf16_cpu
    from pipeline.runtime import cpu_isa, usable_cores

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        cpu = None
    print(f"SimpleUNet width {WIDTH}, {CLASSES} classes, {SIDE}x{SIDE}, global batch {BATCH}, synthetic data, "
          f"training steps only; CPU {cpu or platform.machine()}, best ISA {cpu_isa()} "
          f"(native bf16: {'yes' if native_bf16_cpu() else 'no'}), {usable_cores()} usable cores, "
          f"torch {torch.__version__}")
    rows = [("(a) 1 process x 2 threads, fp32", measure(1, 2, "fp32", args.steps)),
            ("(a) 2 processes x 1 thread, fp32 (gloo)", measure(2, 1, "fp32", args.steps)),
            ("(b) 1 process x 2 threads, fp32", measure(1, 2, "fp32", args.steps)),
            ("(b) 1 process x 2 threads, bf16 autocast", measure(1, 2, "bf16", args.bf16_steps))]
    for name, result in rows:
        print(f"{name:45s} {result['images_per_s']:8.1f} images/s")
    a1, a2, b1, b2 = (r["images_per_s"] for _, r in rows)
    print(f"(a) 2 processes / 1 process: {a2 / a1:.2f}x;  (b) bf16 / fp32: {b2 / b1:.3f}x")


if __name__ == "__main__":
    main()
