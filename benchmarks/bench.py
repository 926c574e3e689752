"""Speed, quality and cost of the pipeline on this machine: ``python -m benchmarks.bench [--quick] [--out FILE]``.

Run from the repository root, after ``dvc repro``. Four sections (see benchmarks/README.md):

1. throughput: the MNIST tutorial's training loop against the product's, same model (SimpleUNet width 64) and
   batch (100), in alternating rounds, with the share of each loop's step spent in convolutions; and the
   product's inference speed;
2. roofline: FLOPs per image, and the product loop's achieved FLOP/s against a measured float32 matmul ceiling;
3. time to quality: the real train and evaluate stages, in a temporary copy of the repository; for MNIST,
   every epoch's model scored on the test split, and the time to the tutorial's Dice against the tutorial's
   own time, projected from its loop's throughput measured in the same run;
4. pipeline overhead: ``dvc status`` and a no-op ``dvc repro`` in the repository, and every stage's peak RSS;
5. scaling (``benchmarks/scaling.py``): 2 processes x 1 thread against 1 x 2, and bf16 against fp32 (speed and
   the test Dice of a short recipe), with the CPU's instruction set.

Every measurement that touches torch runs in its own subprocess (``--worker``), so that process-wide settings
(flush-denormal, glibc mallopt, thread counts) and peak memory never leak from one variant into another.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

# Inherited by every measuring subprocess: albumentations would otherwise look for updates on PyPI at import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
REPO = Path(__file__).resolve().parents[1]
MNIST = REPO / "data/prepared/mnist"
BATCH, WIDTH, LR = 100, 64, 1e-3  # the tutorial's recipe
WARMUP_STEPS = 2  # first steps pay for allocator growth, oneDNN kernel selection and thread-pool start-up
PROFILED_STEPS = 2  # after the timed steps: where a step's time goes (convolutions or everything else)
# Convolution kernels, forward and backward; everything else in a step is element-wise work, data, optimiser.
CONVOLUTION_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")
# Dataset: (eval.json score, target, train wall-time limit in s). STARE's is F1 (= Dice) on the 10 test images.
QUALITY = {"mnist": ("dice", 0.980, 600), "stare": ("dice", 0.845, 600)}
# The MNIST tutorial's recipe and result: 20 epochs over the 60,000 official training images (it holds none
# out), test foreground Dice 0.9793 (TP 1,247,593 / FP 21,385 / FN 31,288).
TUTORIAL_EPOCHS, TUTORIAL_TRAIN_IMAGES, TUTORIAL_DICE = 20, 60_000, 0.9793
TUTORIAL_SPEEDUP_TARGET = 150
# The time-to-quality recipe, applied over params.yaml's MNIST defaults: as short as reaches the tutorial's Dice.
# The default recipe trains longer, for the best model in reasonable time (README, Results); this one is the
# benchmark's own, as speedruns keep theirs. Try it in the project: dvc exp run -S mnist.train.epochs=2 ...
SPEEDRUN = {"mnist": {"epochs": 2, "samples_per_epoch": 40_000}}
# --quick: just enough training to exercise every stage; its quality and memory figures are not judged.
TINY_TRAIN = {
    "mnist": {"width": 4, "epochs": 1, "samples_per_epoch": 500},
    "stare": {"width": 4, "epochs": 1, "samples_per_epoch": 16, "batch_size": 4},
}
DVC_TARGET_S, RSS_TARGET_MIB = 3.0, 4096


# ------------------------------------------------------------------------------------------ workers (subprocesses)


def timed_steps(batches, step, n: int) -> dict:
    """Run ``step`` on each of the ``n`` images' batches: warm-up steps, timed steps, then profiled steps.

    images/s is over the timed steps, data loading included. The profiled steps say how much of a step's
    wall time the convolution kernels take: the profiler times each op on the thread that calls it, so an
    op's time is its wall time across both intra-op threads. The rest (element-wise layers, data, optimiser,
    allocator) is all that a better loop could still remove, since both loops run the same convolutions.
    """
    from torch.profiler import ProfilerActivity, profile

    last_timed = -(-n // BATCH) - PROFILED_STEPS  # index of the first profiled batch
    tracer = profile(activities=[ProfilerActivity.CPU])
    start = seen = 0
    for i, batch in enumerate(batches):
        step(batch)
        if WARMUP_STEPS <= i < last_timed:
            seen += len(batch[0])
        if i + 1 == WARMUP_STEPS:
            start = time.perf_counter()
        if i + 1 == last_timed:  # the timed steps end here; the profiled ones, data loading included, begin
            elapsed = time.perf_counter() - start
            tracer.__enter__()
            profile_start = time.perf_counter()
            profiled = 0
        if i + 1 > last_timed:
            profiled += len(batch[0])
    profile_wall = time.perf_counter() - profile_start
    tracer.__exit__(None, None, None)
    convolution_s = sum(e.self_cpu_time_total for e in tracer.key_averages() if e.key in CONVOLUTION_OPS) / 1e6
    return {
        "images_per_s": seen / elapsed,
        "timed_images": seen,
        "convolution_share": convolution_s / profile_wall,
        "convolution_s_per_image": convolution_s / profiled,
    }


def tutorial_worker(n: int) -> dict:
    """The tutorial's loop as written there: torch defaults, float conversion and warp per sample in a Dataset."""
    import albumentations as A
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pipeline.architectures.simple_unet import SimpleUNet
    from pipeline.prepared import load_split

    class TutorialMnist(Dataset):
        def __init__(self, images, masks):
            self.images, self.masks = images, masks
            self.augment = A.Affine(scale=(0.85, 1.15), translate_px=(-2, 2), rotate=(-10, 10), shear=(-15, 15), p=1.0)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            out = self.augment(image=self.images[i].astype(np.float32) / 255, mask=self.masks[i])
            return torch.from_numpy(out["image"]).permute(2, 0, 1), torch.from_numpy(out["mask"]).long()

    torch.manual_seed(0)  # same initial weights as the product's run; changes no setting
    split = load_split(MNIST, "train")
    # num_workers=0 is DataLoader's default and the tutorial's: workers would compete with torch's threads.
    loader = DataLoader(TutorialMnist(split.images[:n], split.masks[:n]), batch_size=BATCH, shuffle=True)
    model = SimpleUNet(1, 11, WIDTH)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = torch.nn.CrossEntropyLoss()

    def step(batch):
        images, masks = batch
        loss = criterion(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()

    model.train()
    return {**timed_steps(loader, step, n), "threads": torch.get_num_threads(), "num_workers": 0}


def product_worker(n: int) -> dict:
    """The product's loop: the train stage's Trainer (its model, augmentation, loader and training step) with the
    tutorial's model, batch and optimiser -- SimpleUNet width 64, batch 100, Adam 1e-3, float32, no schedule."""
    import dataclasses

    import numpy as np
    import torch

    from pipeline.engine import Trainer, TrainingData
    from pipeline.loader import AugmentedBatches, augmenting_loader
    from pipeline.params import load_params
    from pipeline.prepared import load_meta, open_splits
    from pipeline.runtime import setup
    from pipeline.train_params import TrainParams

    train = load_params("mnist", "train", TrainParams)
    device = setup(train.seed)
    tutorial = {"arch": "simple_unet", "width": WIDTH, "batch_size": BATCH, "lr": LR, "weight_decay": 0.0}
    recipe = dataclasses.replace(train, **tutorial, schedule="constant", patch_size=None, precision="fp32", processes=1)
    splits = open_splits(MNIST, ("train", "val"))
    data = TrainingData(MNIST, load_meta(MNIST), splits["train"], splits["val"])
    trainer = Trainer("mnist", recipe, data, REPO / "data/models/mnist/model.pt", device, None)  # writes nothing
    trainer.build()  # MNIST has no field of view: its augmentation fills with background, as the stage's does
    order = np.random.default_rng(train.seed).permutation(n)

    def step(batch):
        trainer.train_step(*batch).item()

    trainer.model.train()
    batches = augmenting_loader(AugmentedBatches(data.train, order, BATCH, trainer.augment, train.seed, 0), device)
    return {**timed_steps(batches, step, n), "threads": torch.get_num_threads()}


def inference_worker(n: int) -> dict:
    """pipeline.inference.predict_batches (inference mode) over n test images, at width 64 and the default width."""
    import torch

    from pipeline.evaluate import EvaluateParams
    from pipeline.inference import predict_batches
    from pipeline.models import build_model
    from pipeline.params import load_params
    from pipeline.prepared import load_split
    from pipeline.runtime import setup
    from pipeline.train_params import TrainParams

    device = setup(0)
    images = load_split(MNIST, "test").images[:n]
    batch_size = load_params("mnist", "evaluate", EvaluateParams).batch_size
    result = {"batch_size": batch_size, "threads": torch.get_num_threads()}
    for width in sorted({WIDTH, load_params("mnist", "train", TrainParams).width}):
        # Built as load_checkpoint builds it, so the weights' memory layout is the evaluate stage's.
        model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": 11, "width": width})
        model = model.to(device, memory_format=torch.channels_last).eval()
        for _ in predict_batches(model, images[:batch_size], batch_size, device):  # warm-up
            pass
        start = time.perf_counter()
        for _ in predict_batches(model, images, batch_size, device):
            pass
        result[f"width_{width}"] = len(images) / (time.perf_counter() - start)
    return result


def roofline_worker(n: int) -> dict:
    """FLOPs per 28x28 image (forward; forward + backward) and the float32 matmul ceiling, with training's threads."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.architectures.simple_unet import SimpleUNet
    from pipeline.params import load_params
    from pipeline.runtime import setup
    from pipeline.train_params import TrainParams

    setup(0)
    images, targets = torch.rand(4, 1, 28, 28), torch.randint(0, 11, (4, 28, 28))
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for width in sorted({WIDTH, load_params("mnist", "train", TrainParams).width}):
        model = SimpleUNet(1, 11, width)
        with FlopCounterMode(display=False) as forward:
            model(images)
        with FlopCounterMode(display=False) as training:
            F.cross_entropy(model(images), targets).backward()
        result[f"width_{width}"] = {
            "forward_flops": forward.get_total_flops() / len(images),
            "train_flops": training.get_total_flops() / len(images),
        }
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    # Best of several after a warm-up: the fastest run is the one least disturbed by anything else on the machine.
    best = min(timeit.repeat(lambda: torch.mm(a, b), number=1, repeat=9)[1:])
    result["matmul_flops_per_s"] = 2 * 2048**3 / best
    return result


def epoch_dice_worker(n: int) -> dict:
    """Test Dice of each epoch's model that ``EpochSnapshots`` kept (``$SEGPIPE_BENCH_SNAPSHOTS``), scored by
    evaluate's own code; ``n`` is unused."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluate import EvaluateParams
    from pipeline.params import load_params
    from pipeline.prepared import open_split
    from pipeline.runtime import setup
    from pipeline.scoring import evaluate_multiclass

    directory = Path(os.environ["SEGPIPE_BENCH_SNAPSHOTS"])
    device = setup(0)
    model, meta = load_checkpoint(directory / "model.pt", device)  # the final model: the architecture
    test = open_split(MNIST, "test")
    batch_size = load_params("mnist", "evaluate", EvaluateParams).batch_size
    scores = {"model": evaluate_multiclass(model, meta, test, batch_size, device)[0]["dice"]}
    for path in directory.glob("epoch*.pt"):
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        dice = evaluate_multiclass(model, meta, test, batch_size, device)[0]["dice"]
        scores[path.stem] = [state["epochs_done"], dice]
    return scores


WORKERS = {
    "tutorial": tutorial_worker,
    "epoch_dice": epoch_dice_worker,
    "product": product_worker,
    "inference": inference_worker,
    "roofline": roofline_worker,
}


# ------------------------------------------------------------------------------------------ measuring subprocesses


def run_measured(args: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run a command; its wall time, CPU time, peak RSS (wait4: this child and its own children), exit code, output."""
    start = time.perf_counter()
    with subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    ) as proc:
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen not to wait again
    return {
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "rc": proc.returncode,
        "output": output,
    }


def worker(name: str, n: int) -> dict:
    run = run_measured([sys.executable, "-m", "benchmarks.bench", "--worker", name, "--images", str(n)], REPO)
    if run["rc"] != 0:
        raise RuntimeError(f"worker {name} failed ({run['rc']}):\n{run['output']}")
    return {**json.loads(run["output"].splitlines()[-1]), "peak_rss_bytes": run["peak_rss_bytes"]}


def throughput_rounds(n: int, rounds: int) -> dict:
    """Tutorial and product loops in alternating order, round after round; medians and per-round ratios.

    This machine's speed drifts by 10-15 % over minutes; running the two loops back to back, and the pair
    several times in alternating order, keeps that drift out of their ratio.
    """
    runs: dict[str, list[dict]] = {"tutorial": [], "product": []}
    for r in range(rounds):
        for name in ("tutorial", "product") if r % 2 == 0 else ("product", "tutorial"):
            runs[name].append(worker(name, n))
    ratios = [p["images_per_s"] / t["images_per_s"] for t, p in zip(runs["tutorial"], runs["product"])]
    summary = {}
    for name, measured in runs.items():
        summary[name] = {
            key: statistics.median([m[key] for m in measured])
            for key in ("images_per_s", "convolution_share", "convolution_s_per_image", "peak_rss_bytes")
        }
        summary[name]["rounds"] = measured
    tutorial, product = summary["tutorial"], summary["product"]
    # If everything but the convolutions cost nothing, the product loop would run at this speed: with these
    # convolution kernels, no training loop on this model and batch can be faster.
    bound = 1 / product["convolution_s_per_image"]
    return {
        **summary,
        "speedup": statistics.median(ratios),
        "speedup_rounds": ratios,
        "convolutions_only_images_per_s": bound,
        "speedup_bound": bound / tutorial["images_per_s"],
    }


class EpochSnapshots(threading.Thread):
    """Keeps every state the train stage writes at the end of an epoch (``.segpipe/resume/<ds>/state.pt``), with
    the seconds from the stage's start to the write, while the stage runs.

    The stage writes each state under a temporary name and renames it into place, so a new inode at that path
    is a complete state: a hard link keeps it after the next epoch replaces it, at no cost to the training
    (a ``stat`` every 50 ms). The time is the file's own mtime, not when this thread noticed it.
    """

    def __init__(self, state: Path, into: Path):
        super().__init__(daemon=True)
        self.state, self.into, self.start_time = state, into, time.time()
        self.times: dict[int, float] = {}  # snapshot number -> seconds after the start
        self.done = threading.Event()

    def run(self) -> None:
        seen = None
        while not self.done.wait(0.05):
            try:
                inode = os.stat(self.state).st_ino
                if inode != seen:
                    target = self.into / f"epoch{len(self.times) + 1}.pt"
                    os.link(self.state, target)
                    seen = os.stat(target).st_ino  # what was linked, should the state have been replaced since
                    self.times[len(self.times) + 1] = os.stat(target).st_mtime - self.start_time
            except FileNotFoundError:  # not written yet, or removed with the finished training's state
                pass


def epoch_scores(root: Path, watcher: EpochSnapshots, epochs: int) -> list[dict]:
    """``[{"epoch", "seconds", "dice"}]``, one per epoch of the finished MNIST training, in order.

    The final model stands in for the last epoch's state where the stage removed that state (it does once the
    model is written) before the watcher saw it; its time is then the model's, a few hundredths later.
    """
    model = root / "data/models/mnist/model.pt"
    os.link(model, watcher.into / "model.pt")
    run = run_measured(
        [sys.executable, "-m", "benchmarks.bench", "--worker", "epoch_dice"],
        REPO,
        {**os.environ, "SEGPIPE_BENCH_SNAPSHOTS": str(watcher.into)},
    )
    if run["rc"] != 0:
        raise RuntimeError(f"scoring the epochs failed ({run['rc']}):\n{run['output']}")
    scores = json.loads(run["output"].splitlines()[-1])
    rows = {
        epoch: {"epoch": epoch, "seconds": watcher.times[int(stem[5:])], "dice": dice}
        for stem, (epoch, dice) in ((k, v) for k, v in scores.items() if k != "model")
    }
    if epochs not in rows:
        rows[epochs] = {"epoch": epochs, "seconds": model.stat().st_mtime - watcher.start_time, "dice": scores["model"]}
    return [rows[e] for e in sorted(rows)]


def tutorial_quality_time(mnist_epochs: list[dict], tutorial_images_per_s: float) -> dict:
    """When the time-to-quality recipe first reached the tutorial's test Dice, against the tutorial's own time."""
    tutorial_s = TUTORIAL_EPOCHS * TUTORIAL_TRAIN_IMAGES / tutorial_images_per_s
    reached = next((e for e in mnist_epochs if e["dice"] >= TUTORIAL_DICE), None)
    return {
        "tutorial_images_per_s": tutorial_images_per_s,
        "tutorial_projected_s": tutorial_s,
        "reached_at_epoch": None if reached is None else reached["epoch"],
        "seconds": None if reached is None else reached["seconds"],
        "speedup": None if reached is None else tutorial_s / reached["seconds"],
    }


def temporary_copy(root: Path, quick: bool) -> None:
    """The code, params and dvc.yaml of the repository, with its prepared data linked, under ``root``."""
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", root)
    shutil.copy2(REPO / "params.yaml", root)
    import yaml  # only here: the parent process otherwise stays free of third-party imports

    config = yaml.safe_load((root / "params.yaml").read_text())
    for dataset, override in (TINY_TRAIN if quick else SPEEDRUN).items():
        config[dataset]["train"].update(override)
    (root / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (root / "data/prepared").mkdir(parents=True)
    for dataset in QUALITY:
        (root / "data/prepared" / dataset).symlink_to(REPO / "data/prepared" / dataset)


def time_to_quality(datasets: list[str], quick: bool) -> dict:
    """Run every stage of each dataset in a temporary copy: train/evaluate timings, scores, every stage's RSS."""
    mirror = os.environ.get("SEGPIPE_MIRROR", "../shared/mirror")
    if "://" not in mirror:  # a relative directory is relative to the repository, not to the temporary copy
        mirror = str((REPO / mirror).resolve())
    env = {**os.environ, "SEGPIPE_MIRROR": mirror}
    result = {"params": "tiny (--quick)" if quick else f"params.yaml with {SPEEDRUN}", "stages": {}}
    with tempfile.TemporaryDirectory(prefix="segpipe-bench-") as tmp:
        root = Path(tmp)
        temporary_copy(root, quick)

        def stage(name: str, dataset: str) -> dict:
            watch = name == "train" and dataset == "mnist"
            if watch:
                snapshots = root / "epoch-snapshots"
                snapshots.mkdir()
                watcher = EpochSnapshots(root / ".segpipe/resume/mnist/state.pt", snapshots)
                watcher.start()
            run = run_measured([sys.executable, "-m", f"pipeline.{name}", dataset], root, env)
            if watch:
                watcher.done.set()
                watcher.join()
                if run["rc"] == 0:
                    import yaml  # only here: the parent process otherwise stays free of third-party imports

                    epochs = yaml.safe_load((root / "params.yaml").read_text())["mnist"]["train"]["epochs"]
                    result["mnist_epochs"] = epoch_scores(root, watcher, epochs)
            if run["rc"] != 0:
                print(f"{name}@{dataset} failed ({run['rc']}):\n{run['output'][-2000:]}", file=sys.stderr)
            result["stages"][f"{name}@{dataset}"] = {k: v for k, v in run.items() if k != "output"}
            return run

        for dataset in datasets:
            ok = all(stage(name, dataset)["rc"] == 0 for name in ("train", "evaluate"))
            scores = json.loads((root / "metrics" / dataset / "eval.json").read_text()) if ok else {}
            result[dataset] = scores.get(QUALITY[dataset][0])
            if ok:
                stage("render", dataset)
        # download and prepare last, for their memory only: prepare replaces the link to the repository's data
        # with its own output, which atomic_path cannot do over a symlink, so the link goes first.
        for dataset in datasets:
            (root / "data/prepared" / dataset).unlink()
            if stage("download", dataset)["rc"] == 0:
                stage("prepare", dataset)
    return result


def dvc_overhead(repo: Path) -> dict:
    """Best of 3 ``dvc status`` and no-op ``dvc repro``; repro is only timed when status says nothing changed."""

    def best_of_3(*args: str) -> tuple[float | None, str]:
        runs = [run_measured([sys.executable, "-m", "dvc", *args], repo) for _ in range(3)]
        failed = [run for run in runs if run["rc"] != 0]  # e.g. another dvc command holds the repository lock
        return (None, failed[0]["output"]) if failed else (min(run["wall_s"] for run in runs), runs[-1]["output"])

    status_s, status = best_of_3("status", "--json")
    if status_s is None:
        return {"status_s": None, "repro_s": None, "note": f"dvc status failed: {status.strip()[-300:]}"}
    if status.strip().splitlines()[-1] != "{}":
        # A "no-op" repro on an out-of-date repository would run the real stages for tens of minutes.
        return {"status_s": status_s, "repro_s": None, "note": "not up to date: run `dvc repro` first"}
    repro_s, output = best_of_3("repro")
    return {
        "status_s": status_s,
        "repro_s": repro_s,
        **({} if repro_s is not None else {"note": f"dvc repro failed: {output.strip()[-300:]}"}),
    }


# ------------------------------------------------------------------------------------------ report


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    return {
        "cpu": model,
        "cores_available": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "platform": platform.platform(),
    }


def row(
    figure: str, value: float | None, unit: str, target: str = "", passed: bool | None = None, note: str = ""
) -> dict:
    return {
        "figure": figure,
        "value": value,
        "unit": unit,
        "target": target,
        "note": note,
        "result": "" if passed is None else "pass" if passed else "FAIL",
    }


def rows(results: dict, quick: bool) -> list[dict]:
    out = []
    if "throughput" in results:
        t = results["throughput"]
        spread = f"rounds {min(t['speedup_rounds']):.2f}-{max(t['speedup_rounds']):.2f}"
        out += [
            row("train, tutorial loop (w64, batch 100)", t["tutorial"]["images_per_s"], "img/s", note="median"),
            row("train, product loop (w64, batch 100)", t["product"]["images_per_s"], "img/s", note="median"),
            row("product / tutorial", t["speedup"], "x", ">= 1.5", t["speedup"] >= 1.5, spread),
            row("convolutions' share of a step, tutorial", 100 * t["tutorial"]["convolution_share"], "%"),
            row("convolutions' share of a step, product", 100 * t["product"]["convolution_share"], "%"),
            row(
                "convolutions alone, tutorial",
                1 / t["tutorial"]["convolution_s_per_image"],
                "img/s",
                note="images per second of convolution time",
            ),
            row(
                "convolutions alone, product",
                t["convolutions_only_images_per_s"],
                "img/s",
                note="the speed if nothing else cost time",
            ),
            row("that bound / tutorial", t["speedup_bound"], "x", note="the most any loop could gain"),
            row("peak RSS, tutorial loop", t["tutorial"]["peak_rss_bytes"] / 2**20, "MiB"),
            row("peak RSS, product loop", t["product"]["peak_rss_bytes"] / 2**20, "MiB"),
        ]
        out += [
            row(f"inference, product (w{key[6:]}, batch {t['inference']['batch_size']})", value, "img/s")
            for key, value in t["inference"].items()
            if key.startswith("width_")
        ]
    if "roofline" in results:
        r = results["roofline"]
        for key, flops in r.items():
            if key.startswith("width_"):
                out += [
                    row(f"forward FLOPs/image (w{key[6:]})", flops["forward_flops"] / 1e9, "GFLOP"),
                    row(f"training FLOPs/image (w{key[6:]})", flops["train_flops"] / 1e9, "GFLOP"),
                ]
        out.append(row(f"matmul ceiling ({r['threads']} threads)", r["matmul_flops_per_s"] / 1e9, "GFLOP/s"))
        if "achieved_flops_per_s" in r:
            out += [
                row("achieved, product loop w64", r["achieved_flops_per_s"] / 1e9, "GFLOP/s"),
                row(
                    "achieved / ceiling", 100 * r["fraction_of_ceiling"], "%", ">= 50", r["fraction_of_ceiling"] >= 0.5
                ),
                row("in the convolutions' time alone / ceiling", 100 * r["convolution_fraction_of_ceiling"], "%"),
            ]
    if "quality" in results:
        q = results["quality"]
        # With --quick's tiny params the figures only show that every stage ran: they are not judged.
        judge, note = (lambda ok: None, "not judged: --quick") if quick else (lambda ok: ok, "")
        for dataset, (score, target, limit) in QUALITY.items():
            if dataset in q:
                train, value = q["stages"][f"train@{dataset}"], q[dataset]
                evaluate = q["stages"].get(f"evaluate@{dataset}", {})
                out += [
                    row(
                        f"{dataset} test {score}" + (" (time-to-quality recipe)" if dataset in SPEEDRUN else ""),
                        value,
                        "",
                        f">= {target}",
                        judge(value is not None and value >= target),
                        note,
                    ),
                    row(
                        f"{dataset} train wall time",
                        train["wall_s"],
                        "s",
                        f"<= {limit}",
                        judge(train["rc"] == 0 and train["wall_s"] <= limit),
                        note,
                    ),
                    row(f"{dataset} evaluate wall time", evaluate.get("wall_s"), "s"),
                ]
        for epoch in q.get("mnist_epochs", []):
            out.append(
                row(
                    f"mnist test dice after epoch {epoch['epoch']}",
                    epoch["dice"],
                    "",
                    note=f"{epoch['seconds']:.0f} s into train",
                )
            )
        if "tutorial" in q:
            t = q["tutorial"]
            reached = t["seconds"] is not None
            out += [
                row(
                    "tutorial recipe, projected (20 x 60,000 images)",
                    t["tutorial_projected_s"],
                    "s",
                    note=f"its loop at {t['tutorial_images_per_s']:.1f} img/s, this run",
                ),
                row(
                    f"mnist time-to-quality recipe: time to test dice >= {TUTORIAL_DICE}",
                    t["seconds"],
                    "s",
                    note=f"epoch {t['reached_at_epoch']}" if reached else "not reached",
                ),
                row(
                    "time to the tutorial's quality: tutorial / time-to-quality recipe",
                    t["speedup"],
                    "x",
                    f">= {TUTORIAL_SPEEDUP_TARGET}",
                    judge(reached and t["speedup"] >= TUTORIAL_SPEEDUP_TARGET),
                    note,
                ),
            ]
        for name, stage in q["stages"].items():
            rss = stage["peak_rss_bytes"] / 2**20
            out.append(
                row(
                    f"peak RSS, {name}",
                    rss,
                    "MiB",
                    f"<= {RSS_TARGET_MIB}",
                    judge(stage["rc"] == 0 and rss <= RSS_TARGET_MIB),
                    note or ("" if stage["rc"] == 0 else f"stage failed ({stage['rc']})"),
                )
            )
    if "scaling" in results:
        c = results["scaling"]
        out += [
            row("steps, 1 process x 2 threads (w16, batch 128)", c["1x2_fp32"]["images_per_s"], "img/s", note=c["cpu"]),
            row("steps, 2 processes x 1 thread (gloo DDP)", c["2x1_fp32"]["images_per_s"], "img/s"),
            row("2 processes / 1 process", c["2x1_fp32"]["images_per_s"] / c["1x2_fp32"]["images_per_s"], "x"),
            row("steps, fp32", c["fp32"]["images_per_s"], "img/s"),
            row("steps, bf16 autocast", c["bf16"]["images_per_s"], "img/s"),
            row("bf16 / fp32, steps", c["bf16"]["images_per_s"] / c["fp32"]["images_per_s"], "x"),
        ]
        for precision in ("fp32", "bf16"):
            q = c[f"quality_{precision}"]
            out.append(
                row(
                    f"short recipe ({q['images']} images), {precision}: test dice",
                    q["test_dice"],
                    "",
                    note=f"{q['images_per_s']:.0f} img/s training",
                )
            )
    if "overhead" in results:
        o = results["overhead"]
        for name in ("status", "repro"):
            value = o[f"{name}_s"]
            out.append(
                row(
                    f"dvc {name}, best of 3",
                    value,
                    "s",
                    f"< {DVC_TARGET_S:g}",
                    value is not None and value < DVC_TARGET_S,
                    o.get("note", "") if value is None else "",
                )
            )
    return out


def print_table(table: list[dict]) -> None:
    width = max(len(r["figure"]) for r in table)
    print(f"{'figure':<{width}}  {'value':>10} {'unit':<8} {'target':<9} result")
    for r in table:
        value = "n/a" if r["value"] is None else f"{r['value']:.4g}" if abs(r["value"]) < 100 else f"{r['value']:.0f}"
        print(f"{r['figure']:<{width}}  {value:>10} {r['unit']:<8} {r['target']:<9} {r['result']} {r['note']}".rstrip())


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="500 images, 1 round, tiny params for the stage runs (~minutes)"
    )
    parser.add_argument("--images", type=int, help="images per loop and round (default 1500; --quick: 500)")
    parser.add_argument("--rounds", type=int, help="rounds of tutorial and product loop (default 3; --quick: 1)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["throughput", "roofline", "quality", "overhead", "scaling"]
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(QUALITY),
        choices=list(QUALITY),
        help="time to quality of these datasets only (default: all)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/latest.json")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    n = args.images or (500 if args.quick else 1500)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](n)))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    minimum = (WARMUP_STEPS + 1 + PROFILED_STEPS) * BATCH
    if n < minimum:
        parser.error(
            f"--images must be at least {minimum}: {WARMUP_STEPS} warm-up, 1 timed and "
            f"{PROFILED_STEPS} profiled batches of {BATCH}"
        )
    out = args.out.resolve()
    os.chdir(REPO)  # the workers' load_params reads params.yaml relative to the working directory

    results: dict = {
        "machine": machine_info(),
        "settings": {
            "images": n,
            "batch": BATCH,
            "width": WIDTH,
            "warmup_steps": WARMUP_STEPS,
            "rounds": rounds,
            "quick": args.quick,
        },
    }
    if "throughput" not in args.skip:
        print("throughput ...", flush=True)
        results["throughput"] = {**throughput_rounds(n, rounds), "inference": worker("inference", n)}
    if "roofline" not in args.skip:
        print("roofline ...", flush=True)
        roofline = results["roofline"] = worker("roofline", n)
        if "throughput" in results:
            achieved = roofline[f"width_{WIDTH}"]["train_flops"] * results["throughput"]["product"]["images_per_s"]
            # The same FLOPs, in the convolutions' time alone: how close the kernels themselves come to the ceiling.
            in_convolutions = (
                roofline[f"width_{WIDTH}"]["train_flops"] / results["throughput"]["product"]["convolution_s_per_image"]
            )
            roofline.update(
                achieved_flops_per_s=achieved,
                fraction_of_ceiling=achieved / roofline["matmul_flops_per_s"],
                convolution_flops_per_s=in_convolutions,
                convolution_fraction_of_ceiling=in_convolutions / roofline["matmul_flops_per_s"],
            )
    if "quality" not in args.skip:
        print("time to quality (every stage, in a temporary copy) ...", flush=True)
        results["quality"] = quality = time_to_quality(args.datasets, args.quick)
        if "mnist_epochs" in quality:
            # The tutorial loop's speed from this run's throughput rounds, else one round of it now.
            tutorial = (
                results["throughput"]["tutorial"]["images_per_s"]
                if "throughput" in results
                else worker("tutorial", n)["images_per_s"]
            )
            quality["tutorial"] = tutorial_quality_time(quality["mnist_epochs"], tutorial)
    if "overhead" not in args.skip:
        print("dvc overhead ...", flush=True)
        results["overhead"] = dvc_overhead(REPO)
    if "scaling" not in args.skip:
        print("scaling: processes and precisions ...", flush=True)
        from benchmarks import scaling  # the standard library here; torch in its subprocesses

        results["scaling"] = scaling.scaling(
            6 if args.quick else 12, 2 if args.quick else 3, 1000 if args.quick else scaling.QUALITY_IMAGES
        )

    results["table"] = rows(results, args.quick)
    print()
    print_table(results["table"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
