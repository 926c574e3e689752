"""One GPU check: the CUDA tests, the default trainings in fp32 and ``auto`` precision, inference, the loader,
torchrun through NCCL; everything measured goes to ``<out>/gpu_check.json``, every command's output to
``<out>/gpu_check.log``.

    python -m benchmarks.gpu_check [--dry-run] [--out DIR] [--mirror DIR] [--wheels DIR] [--budget-s S]

It runs the stages themselves (``python -m pipeline.<stage> <ds>``), not ``dvc repro``, in a temporary copy of
``pipeline/`` and ``benchmarks/`` with its own params.yaml, reading the raw files from ``--mirror`` (default
``../shared/mirror``, ~30 MB; no network: the copy's ``base_urls`` are empty). Each step starts only if the
time left of ``--budget-s`` (default 450 s, to end inside 8 minutes) covers its rough need; a step still running
at the budget's end is stopped (SIGTERM to its process group). Steps not reached, skipped or failed say why.
``--dry-run``: the same steps on a tiny synthetic mirror (tests/synthetic.py) with tests/tiny_project.py's
TINY_PARAMS, CUDA hidden; what needs CUDA is recorded as skipped. tests/test_gpu_check.py runs it in CI.

A bare GPU machine (Python 3.12, its own torch, no package registry) lacks these; carry them as wheels and
pass ``--wheels DIR``: they are installed with ``pip install --no-index --no-deps --target`` into the work
directory, which every child process gets on its PYTHONPATH. What the stages and tests import, less what the
H200 image has (/work/.library/device/KINDS.md), at constraints.txt's versions (40 MB installed, roughly 15 MB
of wheels: with the mirror and the 4 MB working tree, under the device's 64 MiB)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        albucore==0.0.24 albumentations==2.0.8 annotated-types==0.8.0 atpublic==9.0.0 configobj==5.0.9 \\
        diskcache==5.6.3 dpath==2.2.0 dulwich==1.2.21 dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 \\
        dvc-objects==5.2.0 dvc-render==1.0.2 dvc-studio-client==0.23.0 dvclive==3.49.1 flatten-dict==0.5.0 \\
        flufl.lock==9.2.0 funcy==2.1 orjson==3.13.0 platformdirs==4.14.7 pydantic==2.14.3 pydantic_core==2.50.4 \\
        pydot==4.0.1 pygtrie==2.6.2 ruamel.yaml==0.19.1 scmrepo==3.6.2 simsimd==6.5.16 sqltrie==0.11.3 \\
        stringzilla==5.3.2 typing-inspection==0.4.5 voluptuous==0.16.0 wcwidth==0.9.4 zc.lockfile==4.0

A device session copies ``../shared/mirror`` to ``.mirror`` (both ``.whl`` and ``.mirror`` in
.git/info/exclude), carries both, and runs (timeout ~540 s)::

    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --wheels .whl --mirror .mirror --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from benchmarks.bench import TUTORIAL_DICE, EpochSnapshots, machine_info

REPO = Path(__file__).resolve().parents[1]
PEAK_ENV = "SEGPIPE_GPU_CHECK_PEAK"  # where a wrapped stage writes its torch.cuda peak memory
CUDA_TESTS = [
    "tests/test_distributed.py::test_a_gpu_trains_in_mixed_precision",
    "tests/test_distributed.py::test_two_gpus_train_what_one_gpu_trains",
]
# What the stages, the workers and the CUDA tests import: a missing one is a wheel to carry.
MODULES = [
    "pipeline.download",
    "pipeline.prepare",
    "pipeline.train",
    "pipeline.evaluate",
    "dvclive.live",
    "pytest",
    "psutil",
]
MIN_FREE_GIB = 8  # the default trainings use far less; below this something else holds the GPU
# Step name -> rough seconds a real run needs to finish it (an H200 guess): a step is not started with less.
STEPS = {
    "install": 15,
    "environment": 15,
    "cuda_tests": 60,
    "data": 60,
    "train_mnist_fp32": 50,
    "train_mnist_auto": 50,
    "torchrun": 50,
    "train_stare_fp32": 60,
    "train_stare_auto": 60,
    "inference": 20,
    "loader": 40,
}
GATES = ("install", "environment", "data")  # the steps every later one needs
NO_CUDA = {"status": "skipped", "reason": "--dry-run: CUDA is hidden (CUDA_VISIBLE_DEVICES='')"}


# ------------------------------------------------------------------------------------------ workers (in the copy)


def run_stage(stage: str, dataset: str) -> None:
    """``python -m pipeline.<stage> <dataset>``, and at exit this process's CUDA peak memory to ``$PEAK_ENV``."""
    import atexit
    import runpy

    def write_peak() -> None:
        torch = sys.modules.get("torch")
        used = torch is not None and torch.cuda.is_initialized()
        Path(os.environ[PEAK_ENV]).write_text(
            json.dumps(
                {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
                if used
                else None
            )
        )

    atexit.register(write_peak)
    sys.argv = [f"pipeline.{stage}", dataset]
    runpy.run_module(f"pipeline.{stage}", run_name="__main__", alter_sys=True)


def environment_worker(dataset: str, steps: int) -> dict:
    import importlib
    import platform

    missing = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is a missing or broken package
            missing[name] = f"{type(e).__name__}: {e}"
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "missing_modules": missing,
    }
    if info["cuda"]:
        free, total = torch.cuda.mem_get_info()
        info.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            bf16=torch.cuda.is_bf16_supported(),
            free_bytes=free,
            total_bytes=total,
            cuda_version=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return info


def _settings_and_device(dataset: str):
    """``<dataset>.train`` and the device the stage would train on (under torchrun, its local rank's GPU)."""
    import torch

    from pipeline.params import load_params
    from pipeline.runtime import setup
    from pipeline.train_params import TrainParams

    s = load_params(dataset, "train", TrainParams)
    device = setup(s.seed, s.threads)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return s, device


def _trainer(dataset: str, settings, device, group=None):
    """The train stage's :class:`Trainer` for ``dataset``, built (precision, model, optimiser, augmentation, loss,
    scaler) but with no learning-rate schedule: these workers take more steps than the schedule has, at the set
    rate. Also ``batches(n_steps, epoch, rank, world)``: that many global batches of random training samples."""
    import numpy as np

    from pipeline.engine import Trainer, TrainingData
    from pipeline.loader import AugmentedBatches
    from pipeline.prepared import load_meta, open_splits
    from pipeline.stage import DatasetPaths

    class Unscheduled(Trainer):
        def build_scheduler(self, optimizer, steps_per_epoch):
            return None

    paths, s = DatasetPaths(dataset), settings
    splits = open_splits(paths.prepared, ("train", "val"))
    data = TrainingData(paths.prepared, load_meta(paths.prepared), splits["train"], splits["val"])
    trainer = Unscheduled(dataset, s, data, paths.model, device, group)
    trainer.build()

    def batches(n_steps: int, epoch: int, rank: int = 0, world: int = 1) -> AugmentedBatches:
        order = np.random.default_rng([s.seed, epoch]).integers(0, len(data.train), n_steps * s.batch_size)
        return AugmentedBatches(data.train, order, s.batch_size, trainer.augment, s.seed, epoch, rank, world)

    return trainer, batches


class TimedLoader:
    """A loader whose batches are kept as they come, with the time spent waiting for them; the worker's start
    and end are timed apart (fixed costs per epoch, not per step)."""

    def __init__(self, loader):
        self.loader, self.kept, self.wait_s, self.start_s, self.stop_s = loader, [], 0.0, 0.0, 0.0

    def __len__(self) -> int:  # train_one_epoch's progress bar asks
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        batches = iter(self.loader)
        self.start_s = time.perf_counter() - start
        while True:  # to the end: an exhausted DataLoader ends its worker
            start = time.perf_counter()
            try:
                self.kept.append(next(batches))
            except StopIteration:
                self.stop_s = time.perf_counter() - start
                return
            self.wait_s += time.perf_counter() - start
            yield self.kept[-1]


def loader_worker(dataset: str, steps: int) -> dict:
    """The Trainer's train_one_epoch over the stage's loader, timing its waits; then over the same batches already
    loaded."""
    import torch

    from pipeline.loader import augmenting_loader

    s, device = _settings_and_device(dataset)
    trainer, batches = _trainer(dataset, s, device)

    def epoch(loader, epoch_batches) -> float:
        start = time.perf_counter()
        trainer.train_one_epoch(loader, epoch_batches, epoch_batches.epoch, "")
        return time.perf_counter() - start  # train_one_epoch reads its loss at the end: the GPU is done

    warm = batches(max(1, steps // 10), 1)  # warm-up (cuDNN autotuning, allocator), augmented here: no worker to start
    epoch([tuple(map(torch.from_numpy, warm[i])) for i in range(len(warm))], warm)
    timed_batches = batches(steps, 2)
    timed = TimedLoader(augmenting_loader(timed_batches, device))
    with_loader = epoch(timed, timed_batches) - timed.start_s - timed.stop_s
    preloaded = epoch(timed.kept, timed_batches)  # the same batches, already loaded
    images = steps * s.batch_size
    return {
        "precision": trainer.precision,
        "device": str(device),
        "steps": steps,
        "batch_size": s.batch_size,
        "images_per_s": images / with_loader,
        "images_per_s_preloaded": images / preloaded,
        "data_wait_share": timed.wait_s / with_loader,
        "worker_start_s": timed.start_s,
        "worker_stop_s": timed.stop_s,
    }


def inference_worker(dataset: str, steps: int) -> dict:
    """pipeline.inference.predict_batches over the test split, with the evaluate stage's batch and TTA."""
    import torch

    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluate import EvaluateParams
    from pipeline.inference import predict_batches
    from pipeline.params import load_params
    from pipeline.prepared import load_split
    from pipeline.runtime import setup
    from pipeline.stage import DatasetPaths

    device = setup(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this dataset's peak, not the previous one's
    settings = load_params(dataset, "evaluate", EvaluateParams)
    model, _ = load_checkpoint(DatasetPaths(dataset).model, device)
    images = load_split(DatasetPaths(dataset).prepared, "test").images
    for _ in predict_batches(model, images[: settings.batch_size], settings.batch_size, device, settings.tta):
        pass  # warm-up
    start = time.perf_counter()
    for _ in predict_batches(model, images, settings.batch_size, device, settings.tta):
        pass  # each batch's logits come back to the CPU: the GPU is done when the loop is
    elapsed = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else {"status": "skipped", "reason": "no CUDA device: the model ran on the CPU"}
    )
    return {
        "images": len(images),
        "batch_size": settings.batch_size,
        "tta": settings.tta,
        "images_per_s": len(images) / elapsed,
        "gpu_peak_allocated_bytes": peak,
    }


def nccl_worker(dataset: str, steps: int) -> dict:
    """Under torchrun: the Trainer's distributed pieces (SyncBatchNorm, DistributedDataParallel, the global loss,
    validation) through a process group of this run's world size (NCCL on a GPU, gloo on a CPU), since the
    stage itself joins none at world size 1."""
    import torch
    import torch.distributed as dist

    from pipeline.distributed import Group
    from pipeline.loader import augmenting_loader
    from pipeline.validation import validate

    s, device = _settings_and_device(dataset)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
    group = Group(rank, world, local, device, dist.new_group(backend="gloo") if cuda else None)
    backend = dist.get_backend()
    trainer, batches = _trainer(dataset, s, device, group)  # its model's batch norm synchronized
    model = trainer.training.model
    trainer.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    epoch_batches = batches(steps, 0, rank, world)
    loss = trainer.train_one_epoch(augmenting_loader(epoch_batches, device), epoch_batches, 0, "")
    data = trainer.data
    val_loss, val_dice = validate(
        model, data.val, data.meta, trainer.loss, s.val_batch_size, device, trainer.precision, group
    )
    agreed, gathered = group.agree(None), group.gather(rank)
    group.close()
    return {
        "backend": backend,
        "world": world,
        "precision": trainer.precision,
        "steps": steps,
        "train_loss": loss,
        "val_loss": val_loss,
        "val_dice": val_dice,
        "agree": agreed,
        "gather": gathered,
        "sync_batchnorm": any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
    }


WORKERS = {
    "environment": environment_worker,
    "loader": loader_worker,
    "inference": inference_worker,
    "nccl": nccl_worker,
}


# ------------------------------------------------------------------------------------------ the check


class Check:
    """The temporary project, the child processes' environment, the budget, the log and the report."""

    def __init__(self, args, out: Path, work: Path):
        self.dry, self.out, self.work, self.root = args.dry_run, out, work, work / "project"
        self.deadline = time.monotonic() + args.budget_s
        self.log = open(out / "gpu_check.log", "w")
        self.env = {
            **os.environ,
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "PYTHONUNBUFFERED": "1",
            **({"CUDA_VISIBLE_DEVICES": ""} if self.dry else {}),
        }
        self.report = {
            "mode": "dry-run" if self.dry else "gpu",
            "budget_s": args.budget_s,
            "machine": machine_info(),
            "steps": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, args: list[str], cwd: Path | None = None, **env) -> dict:
        """Run a command in its own process group until it ends or the budget does; wall time, rc, output."""
        self.log.write(f"\n$ {' '.join(args)}  (in {cwd or self.root})\n")
        self.log.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            args,
            cwd=cwd or self.root,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            output, timed_out = proc.communicate(timeout=max(1.0, self.left()))[0], False
        except subprocess.TimeoutExpired:  # the budget is spent: stop it as a user would (a training saves its state)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                output = proc.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output = proc.communicate()[0]
            timed_out = True
        wall = time.perf_counter() - start
        self.log.write(f"{output}-> exit {proc.returncode}{' (stopped: budget spent)' * timed_out}, {wall:.1f} s\n")
        self.log.flush()
        return {"rc": proc.returncode, "wall_s": round(wall, 2), "timed_out": timed_out, "output": output}

    def worker(self, name: str, datasets=("mnist",), steps: int = 0, launcher: list[str] | None = None) -> dict:
        """A worker's result per dataset (one process for all), or the failure of that process."""
        result = self.work / f"{name}.json"
        run = self.run(
            [
                *(launcher or [sys.executable]),
                "-m",
                "benchmarks.gpu_check",
                "--worker",
                name,
                "--dataset",
                *datasets,
                "--steps",
                str(steps),
                "--result",
                str(result),
            ]
        )
        return failed(run) if run["rc"] else {**json.loads(result.read_text()), "wall_s": run["wall_s"]}

    def stage(self, stage: str, dataset: str) -> dict:
        """A stage run through run_stage: wall time, rc, output, and its CUDA peak memory."""
        peak = self.work / "peak.json"
        peak.unlink(missing_ok=True)
        run = self.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage, dataset], **{PEAK_ENV: str(peak)}
        )
        run["gpu_peak_bytes"] = NO_CUDA if self.dry else json.loads(peak.read_text()) if peak.exists() else None
        return run

    def write_params(self, changes: dict[str, object]) -> None:
        """The copy's params.yaml: the check's params with ``changes`` (dotted keys) made."""
        params = copy.deepcopy(self.params)
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            section = params
            for name in parents:
                section = section[name]
            section[leaf] = value
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def save(self) -> None:  # after every step: a run killed from outside still leaves what it measured
        temporary = self.out / "gpu_check.json.tmp"
        temporary.write_text(json.dumps(self.report, indent=2) + "\n")
        temporary.replace(self.out / "gpu_check.json")


def failed(run: dict, what: str = "") -> dict:
    status = "timed_out" if run["timed_out"] else "failed"
    return {
        "status": status,
        "reason": f"{what}exit {run['rc']}" + (" (budget spent)" if run["timed_out"] else ""),
        "wall_s": run["wall_s"],
        "output_tail": run["output"].strip().splitlines()[-15:],
    }


def make_project(check: Check, mirror: Path) -> None:
    for package in ("pipeline", "benchmarks"):
        shutil.copytree(REPO / package, check.root / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    if check.dry:
        from tests.synthetic import build_mnist, build_raw, manifest_for
        from tests.tiny_project import TINY_PARAMS

        mirror = check.work / "mirror"
        build_mnist(mirror / "mnist")
        build_raw(mirror / "stare")
        for dataset in ("mnist", "stare"):  # the synthetic files' checksums, as tests/tiny_project.py does
            (check.root / f"pipeline/checksums/{dataset}.json").write_text(json.dumps(manifest_for(mirror / dataset)))
        check.params = copy.deepcopy(TINY_PARAMS)
        for dataset in ("mnist", "stare"):
            check.params[dataset].pop("download")  # config.yaml's; without one, the mirror alone
    else:
        check.params = yaml.safe_load((REPO / "params.yaml").read_text())
    # No config.yaml in the copy: download's sources default to the mirror alone (no network here).
    check.env["SEGPIPE_MIRROR"], check.mirror = str(mirror), mirror
    check.write_params({})


# ------------------------------------------------------------------------------------------ steps


def install(check: Check, wheels: Path | None) -> dict:
    if wheels is None:
        return {"status": "skipped", "reason": "no --wheels: the packages this Python has"}
    files, site = sorted(str(p) for p in wheels.glob("*.whl")), check.work / "site"
    if not files:
        return {"status": "failed", "reason": f"{wheels}: no wheels"}
    run = check.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(site),
            *files,
        ],
        cwd=REPO,
    )
    if run["rc"]:
        return failed(run, "pip: ")
    check.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"status": "ok", "wall_s": run["wall_s"], "wheels": [Path(f).name for f in files]}


def environment(check: Check) -> dict:
    info = check.worker("environment")
    info = info.get("mnist", info)  # its result (the dataset is not used), or the failure of its process
    if "status" in info:
        return info
    problems = [f"cannot import {name} ({error})" for name, error in info["missing_modules"].items()]
    if not check.dry and not info["cuda"]:
        problems.append("torch sees no CUDA device")
    elif not check.dry and info["free_bytes"] < MIN_FREE_GIB * 2**30:
        problems.append(f"{info['free_bytes'] / 2**30:.1f} GiB free on the GPU, under {MIN_FREE_GIB} GiB")
    check.report["machine"]["gpu"] = NO_CUDA if check.dry else info.get("device")
    return {**info, "status": "failed" if problems else "ok", **({"reason": "; ".join(problems)} if problems else {})}


def cuda_tests(check: Check) -> dict:
    """The test suite's CUDA tests, by node id (so a renamed test fails here, on any machine)."""
    junit = check.work / "cuda_tests.xml"
    run = check.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *CUDA_TESTS], cwd=REPO
    )
    if not junit.exists():
        return failed(run, "pytest: ")
    tests = {}
    for case in ET.parse(junit).iter("testcase"):
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        tests[case.get("name")] = (
            {"outcome": "passed"}
            if outcome is None
            else {"outcome": outcome.tag, "message": (outcome.get("message") or "")[:500]}
        )
    outcomes = {t["outcome"] for t in tests.values()}
    status = (
        "failed"
        if outcomes & {"failure", "error"} or len(tests) != len(CUDA_TESTS)
        else "skipped"
        if outcomes == {"skipped"}
        else "ok"
    )
    reasons = sorted({t["message"] for t in tests.values() if t["outcome"] != "passed"})
    return {
        "status": status,
        "wall_s": run["wall_s"],
        "tests": tests,
        **({"reason": "; ".join(reasons)} if reasons else {}),
    }


def data(check: Check) -> dict:
    if not check.mirror.is_dir():
        return {"status": "failed", "reason": f"--mirror {check.mirror}: not a directory (raw MNIST and STARE files)"}
    result = {"status": "ok", "mirror": str(check.mirror)}
    for dataset in ("mnist", "stare"):
        for stage in ("download", "prepare"):
            run = check.stage(stage, dataset)
            if run["rc"]:
                return failed(run, f"{stage}@{dataset}: ")
            result[f"{stage}_{dataset}_s"] = run["wall_s"]
    return result


def training(check: Check, dataset: str, precision: str) -> dict:
    """train then evaluate, the default params in ``precision``; for MNIST, each epoch's test Dice and time."""
    if check.dry and precision == "auto":  # the same run as fp32's: CI need not pay for it twice
        return {
            "status": "skipped",
            "reason": f"--dry-run: without CUDA auto is fp32 (pipeline/precision.py), run by train_{dataset}_fp32",
        }
    check.write_params({f"{dataset}.train.precision": precision})
    watcher = None
    if dataset == "mnist":
        (check.work / f"snapshots-{precision}").mkdir()
        watcher = EpochSnapshots(check.root / ".segpipe/resume/mnist/state.pt", check.work / f"snapshots-{precision}")
        watcher.start()
    train = check.stage("train", dataset)
    if watcher:
        watcher.done.set()
        watcher.join()
    if train["rc"]:
        return failed(train, "train: ")
    evaluate = check.stage("evaluate", dataset)
    if evaluate["rc"]:
        return failed(evaluate, "evaluate: ")
    summary = train["output"].strip().splitlines()[-1]  # "train <ds>: E epochs in T s, N images/s ..."
    speed = re.search(r"(\d+) images/s", summary)
    metrics = check.root / "metrics" / dataset
    result = {
        "status": "ok",
        "train_wall_s": train["wall_s"],
        "evaluate_wall_s": evaluate["wall_s"],
        "images_per_s": int(speed.group(1)) if speed else None,
        "summary": summary,
        "runtime": json.loads((metrics / "train/metrics.json").read_text())["runtime"],
        "test": json.loads((metrics / "eval.json").read_text()),
        "gpu_peak_bytes": {"train": train["gpu_peak_bytes"], "evaluate": evaluate["gpu_peak_bytes"]},
    }
    if watcher:
        result["epochs"] = epochs = epoch_dice(check, watcher)
        reached = next((e for e in epochs if e["dice"] >= TUTORIAL_DICE), None) if isinstance(epochs, list) else None
        result["seconds_to_tutorial_dice"] = reached and reached["seconds"]  # None: not reached, or not scored
    return result


def epoch_dice(check: Check, watcher: EpochSnapshots) -> list[dict] | dict:
    """Each kept epoch's test Dice (bench's epoch_dice worker, run in the copy) and its seconds into the training."""
    model, epochs = check.root / "data/models/mnist/model.pt", check.params["mnist"]["train"]["epochs"]
    os.link(model, watcher.into / "model.pt")
    run = check.run(
        [sys.executable, "-m", "benchmarks.bench", "--worker", "epoch_dice"], SEGPIPE_BENCH_SNAPSHOTS=str(watcher.into)
    )
    if run["rc"]:
        return failed(run)
    scores = json.loads(run["output"].splitlines()[-1])
    rows = [
        {"epoch": epoch, "seconds": round(watcher.times[int(stem[5:])], 2), "dice": dice}
        for stem, (epoch, dice) in ((k, v) for k, v in scores.items() if k != "model")
    ]
    if epochs not in [r["epoch"] for r in rows]:  # the last state was removed before the watcher saw it
        rows.append(
            {"epoch": epochs, "seconds": round(model.stat().st_mtime - watcher.start_time, 2), "dice": scores["model"]}
        )
    return sorted(rows, key=lambda r: r["epoch"])


def torchrun(check: Check) -> dict:
    """The stage under a 1-process torchrun (shortened), then the stage's distributed pieces through a group."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    check.write_params({"mnist.train.epochs": 1, **({} if check.dry else {"mnist.train.samples_per_epoch": 10000})})
    stage = check.run([*launcher, "-m", "pipeline.train", "mnist"])
    check.write_params({})
    group = check.worker("nccl", steps=4 if check.dry else 40, launcher=launcher)
    group = group.get("mnist", group)
    ok = stage["rc"] == 0 and "status" not in group
    return {
        "status": "ok" if ok else "failed",
        **({} if ok else {"reason": "a torchrun run failed"}),
        "stage": {"rc": stage["rc"], "wall_s": stage["wall_s"], "output_tail": stage["output"].splitlines()[-3:]},
        "note": "pipeline.distributed.join starts no process group at WORLD_SIZE 1, so the stage trains as one "
        "process; the nccl worker runs the stage's distributed pieces through a group of 1",
        "group": group,
        **({"nccl": {**NO_CUDA, "reason": NO_CUDA["reason"] + "; gloo ran"}} if check.dry else {}),
    }


def per_dataset(check: Check, name: str, steps: int) -> dict:
    result = check.worker(name, ("mnist", "stare"), steps)
    if "status" in result:
        return result
    failures = [f"{ds}: {r['reason']}" for ds, r in result.items() if isinstance(r, dict) and "status" in r]
    return {"status": "failed" if failures else "ok", **({"reason": "; ".join(failures)} if failures else {}), **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny synthetic data on the CPU, CUDA steps skipped")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/gpu_check")
    parser.add_argument("--mirror", type=Path, default=REPO / "../shared/mirror", help="raw MNIST and STARE files")
    parser.add_argument("--wheels", type=Path, help="a folder of wheels to install first (see the docstring)")
    parser.add_argument("--budget-s", type=float, default=450, help="stop cleanly after this long (default 450)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary project (its path is logged)")
    parser.add_argument("--stage", nargs=2, metavar=("STAGE", "DATASET"), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", nargs="+", default=["mnist"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_stage(*args.stage)
    if args.worker:
        result = {}
        for dataset in args.dataset:
            try:
                result[dataset] = WORKERS[args.worker](dataset, args.steps)
            except Exception as e:  # noqa: BLE001 - one dataset's failure is recorded; the others still run
                result[dataset] = {
                    "status": "failed",
                    "reason": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc().splitlines()[-12:],
                }
        if int(os.environ.get("RANK", "0")) == 0:
            args.result.write_text(json.dumps(result))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args, args.out.resolve(), Path(tempfile.mkdtemp(prefix="segpipe-gpu-check-")))
    plan = {
        "install": lambda: install(check, args.wheels and args.wheels.resolve()),
        "environment": lambda: environment(check),
        "cuda_tests": lambda: cuda_tests(check),
        "data": lambda: data(check),
        **{
            f"train_{ds}_{p}": (lambda ds=ds, p=p: training(check, ds, p))
            for ds in ("mnist", "stare")
            for p in ("fp32", "auto")
        },
        "torchrun": lambda: torchrun(check),
        "inference": lambda: per_dataset(check, "inference", 0),
        "loader": lambda: per_dataset(check, "loader", 4 if args.dry_run else 200),
    }
    started, blocked = time.monotonic(), None  # blocked: why no later step can run
    try:
        make_project(check, args.mirror.resolve())
        check.log.write(f"temporary project: {check.root}\n")
        for name, needs in STEPS.items():
            if blocked or check.left() < needs:
                budget = f"budget: {max(0, check.left()):.0f} s left, the step needs about {needs} s"
                result = {"status": "not_reached", "reason": blocked or budget}
            else:
                start = time.perf_counter()
                try:
                    result = plan[name]()
                except Exception as e:  # noqa: BLE001 - a bug in a step: record it, go on with the others
                    result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
                result["step_s"] = round(time.perf_counter() - start, 2)
            if name in GATES and result["status"] not in ("ok", "skipped"):
                blocked = blocked or f"{name} {result['status']} ({result.get('reason', '')})"
            check.report["steps"][name] = result
            print(f"{name}: {result['status']}" + (f" ({result['reason']})" if "reason" in result else ""), flush=True)
            check.save()
    finally:
        check.report["wall_s"] = round(time.monotonic() - started, 1)
        check.report["not_reached"] = [n for n, r in check.report["steps"].items() if r["status"] == "not_reached"]
        check.save()
        check.log.close()
        if not args.keep:
            shutil.rmtree(check.work, ignore_errors=True)
    print(f"written: {check.out / 'gpu_check.json'}, {check.out / 'gpu_check.log'} ({check.report['wall_s']:.0f} s)")
    return 1 if any(r["status"] in ("failed", "timed_out") for r in check.report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
