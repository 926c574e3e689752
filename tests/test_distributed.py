"""Data-parallel training (pipeline/distributed.py) and precision (pipeline/precision.py), on CPUs with gloo.

Two processes of one thread train what one process trains: the same samples at every step, the same augmentation
of each sample, the gradient of the same global loss. Not the same bits: the ranks' partial sums add up in another
order (about 1e-7 relative per operation), which Adam carries from step to step; the tolerances are stated where
used. A killed two-process run resumes to the bits of an uninterrupted one; a rank that fails stops the whole run
with its error (injected by tests/hooks/sitecustomize.py). Tests marked ``skipif(not torch.cuda.is_available())``
need a GPU (NCCL, autocast on CUDA) and are reported as not run elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipeline import distributed, loader, losses, precision, resume, train
from pipeline.augment import AffineParams, AugmentParams, build_augmentation
from pipeline.inference import to_input
from pipeline.loader import KEEP_SPLIT_BYTES, AugmentedBatches
from pipeline.losses import IGNORE, global_value
from pipeline.models import build_model
from pipeline.params import ParamError
from pipeline.runtime import cpu_isa
from tests.test_models_train import prepared_split
from tests.test_resume import EPOCHS, SECTION, STATE, assert_same_tensors, mnist_like, tensors
from tests.training_hooks import with_hooks

REPO = Path(__file__).resolve().parents[1]
MODEL = Path("data/models/toy/model.pt")
CURVES = Path("metrics/toy/train")
# 101 training images in batches of 8: 12 full batches (4 samples per rank) and a last one of 5 (3 + 2), so
# that the ranks' parts differ in size, as they may at an epoch's end.
N_TRAIN = 101
TIMEOUT_S = 240  # any run here takes well under a minute; beyond this it is hung


def project(root: Path, **changes) -> Path:
    mnist_like(root, n_train=N_TRAIN)
    (root / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": {**SECTION, **changes}}}))
    return root


def command(root: Path, **env) -> dict:
    """The stage as a process of its own; ``env`` may set the test hooks of tests/hooks/sitecustomize.py."""
    return {
        "args": [sys.executable, "-m", "pipeline.train", "toy"],
        "cwd": root,
        "text": True,
        "stdin": subprocess.DEVNULL,
        "env": with_hooks(
            {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "CUDA_VISIBLE_DEVICES": "",
                "SEGPIPE_COLLECTIVE_TIMEOUT_S": "60",
            },
            **env,
        ),
    }


def train_in(root: Path, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(**command(root, **env), capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def curve(root: Path, name: str) -> list[float]:
    lines = (root / CURVES / "plots/metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


def sample_log(directory: Path, rank: int) -> dict[tuple[int, int], list[int]]:
    rows = [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]
    return {(row["epoch"], row["step"]): row["samples"] for row in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny training in one process and in two (one thread each), each rank's samples logged."""
    out = {}
    for processes in (1, 2):
        root = project(tmp_path_factory.mktemp(f"processes{processes}"), processes=processes)
        logs = root / "samples"
        logs.mkdir()
        result = train_in(root, SEGPIPE_TEST_SAMPLE_LOG=str(logs))
        out[processes] = {
            "root": root,
            "model": tensors(root / MODEL),
            "logs": logs,
            "stdout": result.stdout,
            "metrics": json.loads((root / CURVES / "metrics.json").read_text()),
        }
    return out


def test_each_global_batch_is_split_among_the_ranks(runs):
    single = sample_log(runs[1]["logs"], 0)
    ranks = [sample_log(runs[2]["logs"], rank) for rank in (0, 1)]
    assert len(single) == EPOCHS * 13 and set(ranks[0]) == set(ranks[1]) == set(single)
    for step, samples in single.items():
        assert ranks[0][step] + ranks[1][step] == samples, step  # rank 0's part, then rank 1's: the global batch
        assert [len(r[step]) for r in ranks] == ([4, 4] if len(samples) == 8 else [3, 2]), step
    assert not (runs[2]["logs"] / "rank2.jsonl").exists()


def test_two_processes_train_what_one_process_trains(runs):
    """Within what float rounding alone moves this training, measured by changing one process's thread count.

    The two runs compute the same gradients up to float32 rounding in another summation order (at the first
    step, to 1e-5 of the largest gradient: test_gradients_are_the_global_batchs), and this tiny configuration
    (width 4, Adam at up to lr 0.01) amplifies rounding: Adam turns a near-zero gradient's sign flip into a
    full step. Measured on this configuration, AVX2, one process at 1 against 2 threads (rounding only):
    train / val loss relative differences 1.2e-5 / 1.8e-5 after epoch 1, 5.4e-4 / 8.7e-4 after epoch 3, val
    Dice 0.215 against 0.208. Two processes against one: 5.0e-5 / 3.3e-5, then 7.3e-4 / 1.3e-3, val Dice 0.205.
    Tolerances, about 4-10x those: losses relative 5e-4 after epoch 1 and 5e-3 after every epoch, val Dice 0.03
    absolute. A sample seen twice or skipped, a batch norm over half the batch, a loss over one rank's half
    moves the first epoch's loss by far more than 5e-4 (the weights are not compared one by one: rounding
    moved a running mean by 0.3 between the thread counts).
    """
    one, two = runs[1]["root"], runs[2]["root"]
    for name in ("train_loss", "val_loss"):
        assert curve(two, name)[0] == pytest.approx(curve(one, name)[0], rel=5e-4), name
        assert curve(two, name) == pytest.approx(curve(one, name), rel=5e-3), name
    assert curve(two, "val_dice") == pytest.approx(curve(one, "val_dice"), abs=0.03)
    assert curve(two, "lr") == curve(one, "lr")  # one schedule step per global step
    assert set(runs[2]["model"]) == set(runs[1]["model"])  # a checkpoint evaluate reads as any other
    for name, tensor in runs[1]["model"].items():
        if not tensor.is_floating_point():
            assert torch.equal(runs[2]["model"][name], tensor), name  # num_batches_tracked: one per global step


def test_rank_zero_alone_prints_and_writes(runs):
    out = runs[2]["stdout"]
    assert out.count(f"epoch 1/{EPOCHS}:") == 1 and "2 processes" in out
    assert "train toy: rank 1 of 2 done" in out and out.rstrip().endswith("train toy: 2 processes done")
    root = runs[2]["root"]
    assert sorted(p.name for p in (root / "data/models/toy").iterdir()) == ["model.pt"]
    assert not (root / ".segpipe/resume/toy").exists()


def test_the_metrics_say_how_many_processes_and_which_precision(runs):
    version = torch.__version__.split("+")[0]
    assert runs[1]["metrics"]["runtime"] == f"cpu {cpu_isa()} fp32 1x1 torch {version}"
    assert runs[2]["metrics"]["runtime"] == f"cpu {cpu_isa()} fp32 2x1 torch {version}"


def torchrun(root: Path, *options: str, **popen) -> subprocess.Popen:
    """``torchrun <options> -m pipeline.train toy`` in ``root``: torchrun is torch.distributed.run's script."""
    spec = command(root)
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *options, "-m", "pipeline.train", "toy"],
        cwd=spec["cwd"],
        env=spec["env"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen) -> str:
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, out
    return out


def test_the_readmes_torchrun_commands_train_what_the_stage_trains(runs, tmp_path):
    """README, Scaling: one node (``--standalone``), and several nodes meeting at a c10d rendezvous -- here two
    "nodes" on this machine, one process each, at 127.0.0.1. The same 2 ranks x 1 thread as the stage's own
    launch, so the same bits."""
    root = project(tmp_path / "standalone", processes=2)
    out = finish(torchrun(root, "--standalone", "--nproc-per-node=2"))
    assert out.count(f"epoch 1/{EPOCHS}:") == 1  # joined torchrun's run (rank 0 prints), did not launch its own
    assert_same_tensors(tensors(root / MODEL), runs[2]["model"])

    root = project(tmp_path / "nodes", processes=2)
    with socket.socket() as probe:  # a free port for the rendezvous; nothing else binds 127.0.0.1 ports here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nodes = [
        torchrun(
            root,
            "--nnodes=2",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=segpipe-test",
        )
        for _ in range(2)
    ]
    outputs = [finish(node) for node in nodes]
    assert sum(out.count(f"epoch 1/{EPOCHS}:") for out in outputs) == 1
    assert_same_tensors(tensors(root / MODEL), runs[2]["model"])


def test_a_samples_augmentation_does_not_depend_on_its_rank(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, 28, 28, 1), dtype=np.uint8)
    masks = rng.integers(0, 11, (13, 28, 28), dtype=np.uint8)
    order = rng.permutation(13)
    augment = build_augmentation(AugmentParams(affine=AffineParams(), flips=True), None, 0, 0)
    split = prepared_split(tmp_path / "prepared", images, masks)

    def batches(rank, world):
        return AugmentedBatches(split, order, 8, augment, seed=0, epoch=1, rank=rank, world=world)

    for i in (0, 1):  # a batch of 8 (4 + 4) and the last one, of 5 (3 + 2)
        whole = batches(0, 1)[i]
        parts = [batches(rank, 2)[i] for rank in (0, 1)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), whole[0])
        assert np.array_equal(np.concatenate([p[1] for p in parts]), whole[1])
        assert list(batches(0, 2).indices(i)) + list(batches(1, 2).indices(i)) == list(batches(0, 1).indices(i))


def test_shards_cover_everything_once():
    for n in range(0, 20):
        for world in (1, 2, 3, 8):
            parts = [distributed.shard(n, rank, world) for rank in range(world)]
            assert [i for part in parts for i in range(n)[part]] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


# ------------------------------------------------------------------------------------------ gradients


def _global_batch(case: str):
    """A batch of 6 for which the global loss matters: a binary task with pixels outside a field of view,
    distributed unevenly over the batch (so that the ranks' parts have different numbers of valid pixels)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 16, 16, 1), dtype=torch.uint8, generator=generator)
    if case == "cross_entropy":
        targets = torch.randint(0, 3, (6, 16, 16), dtype=torch.uint8, generator=generator)
        targets[:2, :10] = IGNORE
        return images, targets, 3
    targets = (images[..., 0] > 128).to(torch.uint8)
    targets[:2, :, :12] = IGNORE
    return images, targets, 1


def _gradients(model, images, targets, loss, group=None) -> dict[str, torch.Tensor]:
    logits = model(to_input(images))
    loss_fn = losses.LOSSES[loss]["multiclass" if logits.shape[1] > 1 else "binary"]
    (loss_fn(logits, targets) if group is None else global_value(loss_fn, logits, targets)).backward()
    module = model.module if group is not None else model  # DDP's names have a "module." prefix
    return {name: p.grad.clone() for name, p in module.named_parameters()}


LOSSES = ("cross_entropy", "bce_dice")


def _gradient_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = distributed.Group(rank, world, 0, torch.device("cpu"), None)
    results = {}
    for loss in LOSSES:
        images, targets, outputs = _global_batch(loss)
        torch.manual_seed(0)
        model = distributed.synchronize_batchnorm(
            build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": outputs, "width": 4}),
            torch.device("cpu"),
        )
        model = torch.nn.parallel.DistributedDataParallel(model)
        part = distributed.shard(len(images), rank, world)
        results[loss] = {
            "grads": _gradients(model, images[part], targets[part], loss, group),
            "buffers": dict(model.module.named_buffers()),
        }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory) -> dict:
    """Rank 0's gradients and buffers after one DDP backward of 2 ranks, for each loss (one spawn for all)."""
    tmp = tmp_path_factory.mktemp("gradients")
    torch.multiprocessing.spawn(
        _gradient_worker, args=(2, str(tmp / "init"), str(tmp / "grads.pt")), nprocs=2, join=True
    )
    return torch.load(tmp / "grads.pt", weights_only=True)


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_are_the_global_batchs(two_rank_gradients, loss):
    """DDP's averaged gradient over ranks with unequal valid pixels equals one process's on the whole batch:
    to 1e-5 relative to the largest gradient (float32 sums in another order). A mean of per-rank means, or a
    gradient scaled by the world size, is off by far more (a factor of 2 for the latter)."""
    images, targets, outputs = _global_batch(loss)
    torch.manual_seed(0)
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": outputs, "width": 4})
    expected = _gradients(model, images, targets, loss)
    got = two_rank_gradients[loss]
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert (got["grads"][name] - grad).abs().max() <= 1e-5 * scale, name
    for name, buffer in model.named_buffers():  # batch-norm running statistics over the global batch
        if buffer.is_floating_point():
            assert torch.allclose(got["buffers"][name], buffer, rtol=1e-5, atol=1e-6), name


# ------------------------------------------------------------------------------------------ stopping, failing


def workers_of(process: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_two_process_run_resumes_to_the_same_weights(tmp_path, runs, signum):
    """Bit for bit: the same world size and threads, and gloo sums two ranks' values in a fixed order."""
    root = project(tmp_path, processes=2)
    # Each rank waits after each epoch until a stop signal lands (tests/hooks): on a loaded machine the tiny
    # training could otherwise end before the test has read the line and killed the launcher.
    process = subprocess.Popen(
        **command(root, SEGPIPE_TEST_HOLD_S="120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"epoch 1/{EPOCHS}:"):
            workers = workers_of(process)
            os.kill(process.pid, signum)  # the launcher only, as a scheduler or the OOM killer would
            break
    out, err = process.communicate(timeout=TIMEOUT_S)  # the workers hold the pipes until they end
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, alive  # no worker is left training on
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + signum, err
    # SIGKILL: each worker gets SIGTERM as its parent dies; SIGTERM: the launcher passes it on. Either way they
    # stop together after a step, and rank 0 says what is saved.
    assert re.search(rf"train toy: stopped by SIGTERM; the state after epoch [12]/{EPOCHS} is in {STATE}", err), err
    assert (root / STATE).is_file() and not (root / MODEL).exists()

    out = train_in(root).stdout
    assert re.search(rf"resuming at epoch [23]/{EPOCHS} from {STATE}\n", out), out
    assert_same_tensors(tensors(root / MODEL), runs[2]["model"])
    assert (root / CURVES / "metrics.json").read_text() == (runs[2]["root"] / CURVES / "metrics.json").read_text()


def test_a_failing_rank_stops_the_whole_run_with_its_error(tmp_path):
    root = project(tmp_path, processes=2)
    result = subprocess.run(**command(root, SEGPIPE_TEST_FAIL_RANK="1"), capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert (
        "RuntimeError: injected failure in rank 1 ($SEGPIPE_TEST_FAIL_RANK, tests/hooks/sitecustomize.py)"
        in result.stderr
    )
    assert result.stderr.rstrip().endswith(
        "train toy: error: rank 1 of 2 exited with status 1 (its error is above); the other ranks were stopped"
    )
    assert not (root / MODEL).exists()
    assert (
        not (root / CURVES / "metrics.json").exists() or "runtime" not in (root / CURVES / "metrics.json").read_text()
    )


# ------------------------------------------------------------------------------------------ params


@pytest.fixture
def toy(tmp_path, monkeypatch):
    project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_section(root: Path, **changes) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": {**SECTION, **changes}}}))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"processes": 3},
            "toy.train.batch_size: must be a multiple of processes (3): it is the global batch, split "
            "evenly among them, got 8",
        ),
        ({"processes": 0}, "toy.train.processes: must be >= 1, got 0"),
        ({"precision": "fp8"}, "toy.train.precision: must be one of ['auto', 'fp32', 'bf16', 'fp16'], got 'fp8'"),
        (
            {"processes": 4, "batch_size": 16, "samples_per_epoch": 34},
            "toy.train.processes: an epoch's last batch has 2 samples, fewer than the 4 processes",
        ),
    ],
)
def test_bad_settings_are_one_line(toy, capsys, changes, message):
    from pipeline.stage import main

    set_section(toy, **changes)
    assert main(train.train, ["toy"]) == 1
    assert message in capsys.readouterr().err


def test_under_torchrun_processes_must_be_the_world_size(toy, capsys, monkeypatch):
    from pipeline.stage import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(train.train, ["toy"]) == 1
    assert (
        "toy.train.processes: is 1, but torchrun started 2 processes; set it to the world size"
        in capsys.readouterr().err
    )


def test_a_state_of_another_world_size_or_precision_is_not_resumed():
    runtime = {"device": "cpu", "threads": 1, "torch": "2.14.1", "precision": "fp32", "processes": 2}
    saved = resume.ResumeKey({"lr": 0.01}, "0" * 64, runtime).as_saved()
    for change, said in (({"processes": 1}, "processes was 2, now 1"), ({"precision": "bf16"}, "precision was 'fp32'")):
        problem = resume.ResumeKey({"lr": 0.01}, "0" * 64, {**runtime, **change}).mismatch(saved, "toy.train")
        assert problem.startswith("it was written under another runtime (") and said in problem


# ------------------------------------------------------------------------------------------ precision


CPU = torch.device("cpu")


def test_auto_is_fp32_on_a_cpu_even_with_native_bf16(monkeypatch):
    assert precision.resolve("auto", CPU, "k") == "fp32"
    monkeypatch.setattr(precision, "cpu_isa", lambda: "avx512_bf16")
    assert precision.resolve("auto", CPU, "k") == "fp32"  # faster there, quality not measured: AUTO_BF16_ON_NATIVE_CPU
    assert precision.resolve("bf16", CPU, "k") == "bf16"


def test_bf16_on_a_cpu_without_it_and_fp16_on_a_cpu_are_errors(monkeypatch):
    monkeypatch.setattr(precision, "cpu_isa", lambda: "avx2")
    with pytest.raises(
        ParamError,
        match=r"^k: bf16 on this CPU \(avx2, no avx512_bf16 or AMX\) runs in software, "
        r"measured 14x slower than fp32; use auto or fp32$",
    ):
        precision.resolve("bf16", CPU, "k")
    with pytest.raises(ParamError, match="^k: fp16 needs a CUDA GPU; on a CPU use auto or fp32$"):
        precision.resolve("fp16", CPU, "k")


def test_bf16_trains_where_the_cpu_has_it(toy, monkeypatch):
    """The autocast path end to end, on a CPU told it has native bf16 (here it runs in software: slow, tiny)."""
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    set_section(toy, precision="bf16", epochs=1, samples_per_epoch=16)
    train.train("toy")
    summary = json.loads((toy / CURVES / "metrics.json").read_text())
    assert " bf16 1x1 " in summary["runtime"] and np.isfinite(summary["train_loss"])
    assert all(t.dtype in (torch.float32, torch.int64) for t in tensors(toy / MODEL).values())  # weights stay fp32


# ------------------------------------------------------------------------------------------ GPUs


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL, autocast on CUDA)")


@CUDA
def test_a_gpu_trains_in_mixed_precision(tmp_path):
    root = project(tmp_path, threads=None)
    env = {**command(root)["env"]}
    env.pop("CUDA_VISIBLE_DEVICES")
    result = subprocess.run(**{**command(root), "env": env}, capture_output=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    runtime = json.loads((root / CURVES / "metrics.json").read_text())["runtime"]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert runtime.startswith(torch.cuda.get_device_name(0)) and f" {expected} 1x" in runtime


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")
def test_two_gpus_train_what_one_gpu_trains(tmp_path):
    """fp32 on both, so that only the summation order differs (cuDNN autotuning aside: same tolerance as on CPUs,
    for losses; GPU kernels are not deterministic here, see the README)."""
    losses = {}
    for processes in (1, 2):
        root = project(tmp_path / str(processes), processes=processes, precision="fp32", threads=None)
        env = {**command(root)["env"]}
        env.pop("CUDA_VISIBLE_DEVICES")
        result = subprocess.run(**{**command(root), "env": env}, capture_output=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, result.stderr
        losses[processes] = curve(root, "train_loss")
    assert losses[2] == pytest.approx(losses[1], rel=1e-3)


@pytest.mark.parametrize("keep_bytes", [KEEP_SPLIT_BYTES, 0])
def test_a_small_training_split_is_read_once_an_epoch_with_the_same_batches(tmp_path, monkeypatch, keep_bytes):
    """A split that fits in KEEP_SPLIT_BYTES is read from the shards once an epoch (STARE: 10 images, 1,600
    patches), a larger one once a patch; the batches are the same either way, and what is kept is read-only,
    so that no augmentation can change it for the next patch."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    masks = rng.integers(0, 11, (5, 28, 28), dtype=np.uint8)
    split = prepared_split(tmp_path / "prepared", images, masks)
    augment = build_augmentation(AugmentParams(affine=AffineParams(), flips=True), 16, 0, 0)
    order = np.tile(np.arange(5), 6)  # every sample six times in an epoch
    reads = []
    original = type(split).read
    monkeypatch.setattr(type(split), "read", lambda self, i, roles: reads.append(i) or original(self, i, roles))
    monkeypatch.setattr(loader, "KEEP_SPLIT_BYTES", keep_bytes)
    batches = AugmentedBatches(split, order, 4, augment, seed=0, epoch=1)
    got = [batches[i] for i in range(len(batches))]
    assert len(reads) == (5 if keep_bytes else 30)
    assert all(not array.flags.writeable for pair in batches._kept.values() for array in pair)
    monkeypatch.setattr(loader, "KEEP_SPLIT_BYTES", 0)
    fresh = AugmentedBatches(split, order, 4, augment, seed=0, epoch=1)
    for (image, mask), i in zip(got, range(len(fresh))):
        assert np.array_equal(image, fresh[i][0]) and np.array_equal(mask, fresh[i][1])
