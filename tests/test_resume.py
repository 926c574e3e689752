"""A training stopped in the middle -- SIGKILL, Ctrl-C, SIGTERM, under `dvc repro` or not -- resumes where it
stopped and ends with the very weights and curves of a run that was never stopped; until then the tracked
outputs stay as they were. A state written under other params, data or runtime is never used."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

from pipeline import resume, train
from pipeline.atomic import atomic_path
from pipeline.models import build_model
from pipeline.prepared import DatasetMeta, Split, save_prepared
from pipeline.runtime import cpu_isa
from tests.synthetic import finished_pid
from tests.tiny_project import TINY_PARAMS, dvc, make_project
from tests.training_hooks import with_hooks

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
# Small enough that an epoch takes about a second, large enough that a signal sent as epoch 1 ends lands
# in epoch 2. One thread: the cores of a loaded test machine are not oversubscribed.
SECTION = {
    "arch": "simple_unet",
    "width": 4,
    "epochs": EPOCHS,
    "batch_size": 8,
    "lr": 0.01,
    "schedule": "onecycle",
    "augment": {"affine": {"p": 1.0, "interpolation": "nearest"}},
    "val_batch_size": 32,
    "seed": 0,
    "threads": 1,
}
STATE = Path(".segpipe/resume/toy/state.pt")
CURVES = Path("metrics/toy/train")
MODEL = Path("data/models/toy/model.pt")


def mnist_like(root: Path, n_train: int = 96) -> None:
    """Prepared data shaped like MNIST's: a bright bar whose height says the digit, its pixels the digit's class."""
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 30, (n, 28, 28, 1), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 4 + 2 * label : 10 + 2 * label, 8:20] = 200
        masks = np.where(images[..., 0] > 51, labels[:, None, None] + 1, 0).astype(np.uint8)
        return Split(images=images, masks=masks, ids=np.arange(n).astype(str))

    classes = ["background"] + [f"digit {d}" for d in range(10)]
    meta = DatasetMeta(name="toy", task="multiclass", classes=classes, colors=[[20 * i, 0, 0] for i in range(11)])
    save_prepared(root / "data/prepared/toy", meta, {"train": split(n_train), "val": split(16), "test": split(8)})


def write_section(root: Path, **changes) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump({"toy": {"train": {**SECTION, **changes}}}))


def train_command(root: Path) -> dict:
    """How the tests start the stage: as DVC does, a process of its own, with this checkout's code, on the CPU
    (where it is deterministic)."""
    return {
        "args": [sys.executable, "-m", "pipeline.train", "toy"],
        "cwd": root,
        "text": True,
        "stdin": subprocess.DEVNULL,
        "env": {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""},
    }


def run_stage(root: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(**train_command(root), capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def stop_in_epoch_two(command: dict, stop) -> tuple[int, str, str]:
    """Start ``command``, call ``stop(process)`` once epoch 1 is reported (its state written: the line comes
    after it), and wait for the process to end; returns its exit status, stdout and stderr."""
    # The training waits after each epoch until the signal lands (tests/hooks): on a loaded machine this tiny
    # one could otherwise finish before the test has read the line and sent it.
    command = {**command, "env": with_hooks(command["env"], SEGPIPE_TEST_HOLD_S="120")}
    process = subprocess.Popen(**command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"epoch 1/{EPOCHS}:"):
            stop(process)
            break
    out, err = process.communicate(timeout=600)
    return process.returncode, "".join(seen) + out, err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def files_below(root: Path) -> dict[str, bytes]:
    """Every file the stage wrote below ``root``; not the .gitignore entries DVC adds for cached outputs."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


def assert_one_row_per_epoch(curves: Path) -> None:
    for tsv in (curves / "plots/metrics").glob("*.tsv"):
        steps = [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]]
        assert steps == [str(epoch) for epoch in range(EPOCHS)], tsv.name
    last = (curves / "plots/metrics/val_dice.tsv").read_text().splitlines()[-1].split("\t")
    assert json.loads((curves / "metrics.json").read_text())["val_dice"] == float(last[-1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The model and curves of a run that nobody stopped."""
    root = tmp_path_factory.mktemp("uninterrupted")
    mnist_like(root)
    write_section(root)
    out = run_stage(root).stdout
    assert "resuming" not in out and not (root / ".segpipe/resume/toy").exists()
    return tensors(root / MODEL), files_below(root / CURVES)


def old_outputs(root: Path) -> None:
    """Outputs of an earlier training, which a new one replaces as it goes."""
    (root / CURVES).mkdir(parents=True)
    (root / CURVES / "metrics.json").write_text('{"step": 7}\n')
    (root / MODEL).parent.mkdir(parents=True)
    (root / MODEL).write_bytes(b"an earlier model")


def assert_live_curves_of_the_epochs_done(curves: Path, uninterrupted: dict[str, bytes], done: int) -> None:
    """A stopped run leaves its curves as they were live, the rows of its complete epochs (those of a run that
    nobody stopped), and no model: DVC cannot record such outputs as a finished training."""
    tables = {name: data for name, data in uninterrupted.items() if name.endswith(".tsv")}
    assert tables and sorted(files_below(curves)) == sorted([*tables, "metrics.json"])
    for name, data in tables.items():
        assert (curves / name).read_text().splitlines() == data.decode().splitlines()[: 1 + done], name
    summary = json.loads((curves / "metrics.json").read_text())  # dvclive's, live: no runtime, which ends a run
    assert summary["step"] == done - 1 and "runtime" not in summary  # dvclive counts steps from 0


def send(signum: int, to_group: bool):
    # Ctrl-C in a terminal signals the whole foreground process group: the augmenting worker too.
    return lambda process: (os.killpg if to_group else os.kill)(process.pid, signum)


@pytest.mark.parametrize(
    "signum, to_group",
    [(signal.SIGKILL, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["SIGKILL", "Ctrl-C", "SIGTERM"],
)
def test_a_stopped_training_resumes_to_the_same_weights_and_curves(tmp_path, uninterrupted, signum, to_group):
    mnist_like(tmp_path)
    write_section(tmp_path)
    old_outputs(tmp_path)

    status, out, err = stop_in_epoch_two(train_command(tmp_path), send(signum, to_group))
    if signum == signal.SIGKILL:
        assert status == -signal.SIGKILL
    else:  # stopped cleanly: one line, no traceback, exit status 128 + the signal
        assert status == 128 + signum, err
        assert err == (
            f"train toy: stopped by {signal.Signals(signum).name}; the state after epoch 1/{EPOCHS} is in "
            f"{STATE}: run the stage again to resume\n"
        )
    assert not (tmp_path / MODEL).exists()
    assert_live_curves_of_the_epochs_done(tmp_path / CURVES, uninterrupted[1], done=1)
    assert (tmp_path / STATE).is_file()

    out = run_stage(tmp_path).stdout
    assert f"resuming at epoch 2/{EPOCHS} from {STATE}\n" in out
    assert "epoch 1/" not in out and f"epoch 2/{EPOCHS}:" in out
    model, curves = uninterrupted
    assert_same_tensors(tensors(tmp_path / MODEL), model)
    assert files_below(tmp_path / CURVES) == curves
    assert_one_row_per_epoch(tmp_path / CURVES)
    assert not (tmp_path / ".segpipe/resume/toy").exists()  # removed on success
    assert sorted(p.name for p in (tmp_path / "metrics/toy").iterdir()) == ["train"]  # no temporary left


def test_the_curves_record_the_runtime(uninterrupted):
    _, curves = uninterrupted
    summary = json.loads(curves["metrics.json"])
    # One short string, so that `dvc metrics show` stays narrow: device, CPU instruction set, precision,
    # processes x threads per process, torch.
    isa = cpu_isa()
    assert isa  # e.g. avx2, or the machine's architecture where there are no x86 flags
    assert summary["runtime"] == f"cpu {isa} fp32 1x1 torch {torch.__version__.split('+')[0]}"
    assert set(summary) == {"runtime", "train_loss", "val_loss", "val_dice"}


# ------------------------------------------------------------------------------------------ under DVC


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    """A repository with tiny MNIST prepared through DVC and trained once directly (train is not in dvc.lock),
    and the model and curves of that uninterrupted training."""
    base = tmp_path_factory.mktemp("resume-dvc")
    params = json.loads(json.dumps(TINY_PARAMS))
    params["mnist"]["train"].update(epochs=EPOCHS, threads=1, batch_size=8)
    repo = base / "repo"
    env = make_project(repo, base / "mirror", params)
    env["CUDA_VISIBLE_DEVICES"] = ""
    dvc("repro", "prepare@mnist", cwd=repo, env=env)
    reference = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "mnist"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert reference.returncode == 0, reference.stderr
    return repo, env, tensors(repo / "data/models/mnist/model.pt"), files_below(repo / "metrics/mnist/train")


def train_process(dvc_process: subprocess.Popen) -> psutil.Process:
    """The stage's own process among DVC's descendants (not its augmenting worker, a fork with the same command)."""
    stages = [p for p in psutil.Process(dvc_process.pid).children(recursive=True) if "pipeline.train" in p.cmdline()]
    (main,) = [p for p in stages if p.ppid() not in {s.pid for s in stages}]
    return main


@pytest.mark.parametrize("stop", ["SIGKILL", "Ctrl-C"])
def test_dvc_repro_resumes_a_stopped_training_and_records_it(dvc_project, tmp_path, stop):
    template, env, model, curves = dvc_project
    repo = tmp_path / "repo"
    shutil.copytree(template, repo, symlinks=True)
    outputs = (repo / "metrics/mnist/train", repo / "data/models/mnist/model.pt")
    before = files_below(outputs[0]) | {"model": outputs[1].read_bytes()}
    command = {
        "args": [sys.executable, "-m", "dvc", "repro", "train@mnist"],
        "cwd": repo,
        "env": env,
        "text": True,
        "stdin": subprocess.DEVNULL,
    }
    if stop == "SIGKILL":  # as the kernel's OOM killer would: the stage's process alone, and DVC sees it die
        status, out, err = stop_in_epoch_two(command, lambda dvc_process: train_process(dvc_process).kill())
    else:  # Ctrl-C in the terminal: DVC ignores SIGINT while its command runs, the command stops
        status, out, err = stop_in_epoch_two(command, send(signal.SIGINT, to_group=True))
        assert f"train mnist: stopped by SIGINT; the state after epoch 1/{EPOCHS}" in err
    assert status != 0 and "failed to reproduce 'train@mnist'" in err
    # DVC deletes a stage's outputs before it runs it (they are not persistent, so that DVC's run-cache can
    # record the stage); train writes its curves live and its model once it has succeeded.
    assert before and not outputs[1].exists()
    assert_live_curves_of_the_epochs_done(outputs[0], curves, done=1)
    assert "train@mnist" in json.loads(dvc("status", "--json", "train@mnist", cwd=repo, env=env).stdout)

    out = dvc("repro", "train@mnist", cwd=repo, env=env).stdout
    assert f"resuming at epoch 2/{EPOCHS} from .segpipe/resume/mnist/state.pt" in out
    assert "Data and pipelines are up to date" in dvc("status", "train@mnist", cwd=repo, env=env).stdout
    assert_same_tensors(tensors(outputs[1]), model)
    assert files_below(outputs[0]) == curves
    assert not (repo / ".segpipe/resume/mnist").exists()
    # Nothing of the stopped run for `git add -A` to pick up.
    listed = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not [line for line in listed if ".tmp-" in line or ".segpipe" in line], listed


def test_dvc_shows_the_runtime_beside_the_metrics(dvc_project):
    repo, env, _, _ = dvc_project
    shown = json.loads(dvc("metrics", "show", "--json", cwd=repo, env=env).stdout)
    (workspace,) = shown.values()
    runtime = workspace["data"]["metrics/mnist/train/metrics.json"]["data"]["runtime"]
    assert runtime.startswith("cpu ") and " fp32 1x1 torch " in runtime


# ------------------------------------------------------------------------------------------ what is discarded


@pytest.fixture
def toy(tmp_path, monkeypatch):
    mnist_like(tmp_path, n_train=32)
    write_section(tmp_path, epochs=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def stop_in_process(signum: int) -> None:
    """Train in this process and send it ``signum`` once a state is written; the stage exits 128 + signum."""

    def stop_after_epoch_one():
        while not STATE.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    watcher = threading.Thread(target=stop_after_epoch_one)
    watcher.start()
    with pytest.raises(SystemExit) as exit:
        train.train("toy")
    watcher.join()
    assert exit.value.code == 128 + signum


def test_a_state_written_under_other_params_is_discarded(toy, capsys):
    stop_in_process(signal.SIGTERM)
    assert re.search(r"stopped by SIGTERM; the state after epoch [12]/2 is in", capsys.readouterr().err)
    assert STATE.exists()
    write_section(toy, epochs=2, lr=0.02)
    train.train("toy")
    out = capsys.readouterr().out
    assert (
        f"discarding {STATE}: it was written under other params (toy.train.lr was 0.01, now 0.02); "
        "training from epoch 1\n"
    ) in out
    assert "resuming" not in out and "epoch 1/2:" in out
    assert not STATE.parent.exists()


def test_a_stop_during_the_first_epoch_saves_nothing(toy, capsys):
    def stop_soon():
        while not CURVES.is_dir():  # dvclive has started
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=stop_soon)
    watcher.start()
    with pytest.raises(SystemExit) as exit:
        train.train("toy")
    watcher.join()
    assert exit.value.code == 130
    assert "stopped by SIGINT; no epoch was complete, nothing to resume" in capsys.readouterr().err
    assert not STATE.exists() and not MODEL.exists() and not list(CURVES.rglob("*.tsv"))


def make_training(width: int = 4, seed: int = 0) -> resume.Training:
    torch.manual_seed(seed)
    model = build_model({"arch": "simple_unet", "in_channels": 1, "out_channels": 11, "width": width})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=10)
    return resume.Training(model, optimizer, scheduler, np.random.default_rng(seed), torch.device("cpu"))


def trained_a_step(training: resume.Training) -> resume.Training:
    training.rng.permutation(10)
    training.model(torch.rand(2, 1, 28, 28)).sum().backward()
    training.optimizer.step()
    training.scheduler.step()
    return training


KEY = resume.ResumeKey(
    {"lr": 0.01, "augment": {"scale": (0.9, 1.1)}}, "0" * 64, {"device": "cpu", "threads": 2, "torch": "2.14.1"}
)
ROW = {"train_loss": 1.0, "val_loss": 1.0, "val_dice": 0.5, "lr": 0.001}


@pytest.mark.parametrize(
    "key, width, message",
    [
        (KEY, 4, None),
        (
            resume.ResumeKey({"lr": 0.01, "augment": {"scale": (0.8, 1.1)}}, KEY.data, KEY.runtime),
            4,
            "it was written under other params (toy.train.augment.scale was [0.9, 1.1], now [0.8, 1.1])",
        ),
        (resume.ResumeKey(KEY.params, "1" * 64, KEY.runtime), 4, "it was written for other prepared data"),
        (
            resume.ResumeKey(KEY.params, KEY.data, {**KEY.runtime, "threads": 1}),
            4,
            "it was written under another runtime (threads was 2, now 1), and resuming would give weights that no "
            "uninterrupted run gives",
        ),
        (KEY, 8, "its model tensors are not those of the model this code builds"),
    ],
    ids=["fits", "params", "data", "runtime", "code"],
)
def test_a_state_is_restored_only_under_its_own_key(tmp_path, capsys, key, width, message):
    saved = trained_a_step(make_training())
    training = make_training(width, seed=1)
    path = tmp_path / "state.pt"
    resume.save_state(path, KEY, saved, [ROW, ROW])
    before = {name: tensor.clone() for name, tensor in training.model.state_dict().items()}
    curves = resume.load_state(path, key, "toy.train", training, epochs=3)
    if message is None:
        assert curves == [ROW, ROW] and path.exists()
        assert training.rng.bit_generator.state == saved.rng.bit_generator.state
        assert training.scheduler.state_dict() == saved.scheduler.state_dict()
        assert training.optimizer.state_dict()["param_groups"] == saved.optimizer.state_dict()["param_groups"]
        assert_same_tensors(training.model.state_dict(), saved.model.state_dict())
    else:
        assert curves == [] and not path.exists()
        assert capsys.readouterr().out == f"discarding {path}: {message}; training from epoch 1\n"
        assert_same_tensors(training.model.state_dict(), before)  # nothing restored


@pytest.mark.parametrize("content", [b"", b"not a state", None], ids=["empty", "garbage", "other-format"])
def test_an_unreadable_state_is_discarded(tmp_path, capsys, content):
    path = tmp_path / "state.pt"
    if content is None:
        torch.save({"format": resume.FORMAT + 1}, path)
    else:
        path.write_bytes(content)
    assert resume.load_state(path, KEY, "toy.train", make_training(), epochs=3) == []
    assert not path.exists()
    out = capsys.readouterr().out
    assert out.startswith(f"discarding {path}: it is not a") and out.endswith("; training from epoch 1\n")


def test_threads_must_be_at_least_one(toy, capsys):
    from pipeline.stage import main

    write_section(toy, threads=0)
    assert main(train.train, ["toy"]) == 1
    assert "params.yaml: toy.train.threads: must be >= 1 or null, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ leftovers


def test_atomic_path_removes_what_killed_writers_of_the_same_output_left(tmp_path):
    out = tmp_path / "render"
    killed = tmp_path / f".render.tmp-{finished_pid()}-x1y2z3"
    older_version = tmp_path / ".render.tmp-abc123de"  # named before temporaries carried a pid
    alive = tmp_path / f".render.tmp-{os.getppid()}-a1b2c3"  # a writer still at work
    other_output = tmp_path / f".render.json.tmp-{finished_pid()}-q"
    for leftover in (killed, older_version, alive, other_output):
        (leftover / "render").mkdir(parents=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        assert tmp.parent.name.startswith(f".render.tmp-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["render", alive.name, other_output.name])
